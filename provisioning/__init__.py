"""Fleet and data-center side: opening sealed records, ingest, provisioning (rekam-fleet)."""
