"""rekam kit firmware: the enrollment daemon (rekamd) and the operator CLI (rekam)."""

__version__ = "0.1.0"
