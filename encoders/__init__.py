"""Standard and adversarially robust encoders with named feature taps."""
from encoders.errors import RFIError
from encoders.checkpoints import create_encoder
from encoders.models import ARCHITECTURES, Encoder

__all__ = ["ARCHITECTURES", "Encoder", "RFIError", "create_encoder"]
