"""Records an ABIS ingests, made from archived rekam records (`rekam-fleet export`).

- `enrollment`: the decrypted record read once, checked, into the values every format needs;
- `iso19794`: ISO/IEC 19794-4:2011 finger (FIR v020) and 19794-5:2011 face (FAC v030) records, writer and reader;
- `an2k`: ANSI/NIST-ITL 1-2011 Update:2015 transactions (Type-1/2/14/10) with `nistitl` and `wsq`;
- `cbeff`: MOSIP's CBEFF XML (ISO/IEC 19785-3) with one BIR per biometric;
- `export`: the queue over an archive (cursor, one file per record, atomic, idempotent) and the CLI.

The third-party packages (`nistitl`, `wsq`, `lxml`, Pillow) are imported lazily, inside the functions that
need them: the kit never installs them (extra `datacenter` in pyproject.toml).
"""
