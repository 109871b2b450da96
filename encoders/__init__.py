"""Standard and adversarially robust encoders with named feature taps."""
from encoders.errors import RFIError
from encoders.models import ARCHITECTURES, Encoder, create_encoder

__all__ = ["ARCHITECTURES", "Encoder", "RFIError", "create_encoder"]
