"""Standard and adversarially robust encoders with named feature taps."""

from encoders.core.errors import RFIError
from encoders.nets.factory import create_encoder
from encoders.nets.models import Encoder
from encoders.nets.registry import list_encoders

__all__ = ["Encoder", "RFIError", "create_encoder", "list_encoders"]
