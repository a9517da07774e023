"""On-device iris image quality: ISO/IEC 29794-6 measures by `iris-iqm` (a port of MITRE's BIQT-Iris) and the
kit's gates with stable codes (`firmware.quality.iris.assess`). Heavy imports live in the submodule."""
