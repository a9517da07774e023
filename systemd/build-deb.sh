#!/bin/sh
# Build build/rekam_<version>_<arch>.deb from a DESTDIR install (make deb). Build it on the target
# architecture (the venv holds compiled wheels: numpy, OpenCV...). REKAM_PIP_ARGS as for install.sh.
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=$SRC/build
STAGE=$OUT/deb-root
PYTHON=${PYTHON:-/usr/bin/python3}
command -v dpkg-deb >/dev/null || { echo "dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }
VERSION=$("$PYTHON" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' \
    "$SRC/pyproject.toml")
ARCH=$(dpkg --print-architecture)
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

rm -rf "$STAGE"
DESTDIR=$STAGE sh "$SRC/systemd/install.sh" install
# The state directory is created by postinst, not shipped: dpkg would delete it on purge when empty,
# and must never own the records.
rmdir "$STAGE/var/lib/rekam" "$STAGE/var/lib" "$STAGE/var"
install -d -m 0755 "$STAGE/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$SRC/systemd/deb/$s" "$STAGE/DEBIAN/$s"; done
# Every file under /etc is a conffile: dpkg keeps the kit's edits on upgrade and asks on conflicts.
(cd "$STAGE" && find etc -type f | sed 's#^#/#' | sort) > "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: rekam
Version: $VERSION
Architecture: $ARCH
Maintainer: rekam firmware team <rekam@localhost>
Installed-Size: $SIZE
Depends: python$PYVER, python3-venv, systemd, udev, util-linux, dosfstools, exfatprogs, e2fsprogs, passwd
Recommends: python3-picamera2, chrony
Suggests: gpsd, gpsd-clients
Section: misc
Priority: optional
Description: rekam biometric enrollment kit daemon
 Fingerprint and face capture with on-the-spot quality checks, sealed records
 buffered on SD and USB stick, relayed over MQTT. Installs /opt/rekam, the
 rekam user, systemd units, a udev rule for the mirror stick and a default
 /etc/rekam/rekam.toml. The records in /var/lib/rekam are never removed.
CONTROL
DEB=$OUT/rekam_${VERSION}_${ARCH}.deb
# zstd: Debian 12's dpkg (1.21.18+) reads it, and it packs the venv (numpy, OpenCV...) in seconds where
# dpkg-deb's default xz takes minutes on a Pi (here 0.4 s against 24 s for a 38 MB tree, 14.4 MB against 11.8).
# REKAM_DEB_COMPRESS=xz for a package that older dpkg versions must read.
dpkg-deb -Z"${REKAM_DEB_COMPRESS:-zstd}" --root-owner-group --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
