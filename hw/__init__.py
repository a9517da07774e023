"""Hardware drivers and their simulators. Imports neither `firmware` nor `provisioning`."""
