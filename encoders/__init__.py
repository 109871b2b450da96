"""Standard and adversarially robust encoders with named feature taps."""
from encoders.core.errors import RFIError
from encoders.weights.checkpoints import create_encoder
from encoders.nets.models import ARCHITECTURES, Encoder

__all__ = ["ARCHITECTURES", "Encoder", "RFIError", "create_encoder"]
