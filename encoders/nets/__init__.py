"""Encoder architectures: CNNs (AlexNet, VGG, ResNet), Swin/SwinV2 and their shift-equivariant
modules, each tapped at named layers by :class:`encoders.nets.models.Encoder`."""
