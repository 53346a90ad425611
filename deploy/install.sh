#!/bin/sh
# Installs prefixd for systemd: the binaries, the unit, an example configuration (kept if one is
# there), prefixctl's shell completions and man pages.
#
#   sh deploy/install.sh                  # from a checkout, after `cargo build --release`
#   DESTDIR=/tmp/stage sh deploy/install.sh
#
# BINDIR_FROM: where the built binaries are (default target/release). PREFIX: /usr/local.
# Then: systemctl daemon-reload && systemctl enable --now prefixd
set -eu
here=$(cd "$(dirname "$0")" && pwd)
from=${BINDIR_FROM:-$here/../target/release}
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}

for b in prefixd prefixctl; do
  [ -x "$from/$b" ] || { echo "install.sh: $from/$b not found; run cargo build --release first" >&2; exit 1; }
done
install -d "$dest$prefix/bin" "$dest/etc/prefixd" "$dest/etc/systemd/system" \
  "$dest$prefix/share/bash-completion/completions" "$dest$prefix/share/zsh/site-functions" \
  "$dest$prefix/share/fish/vendor_completions.d" "$dest$prefix/share/man/man1"
install -m 0755 "$from/prefixd" "$from/prefixctl" "$dest$prefix/bin/"
sed "s|/usr/local/bin/prefixd|$prefix/bin/prefixd|" "$here/prefixd.service" > "$dest/etc/systemd/system/prefixd.service"
chmod 0644 "$dest/etc/systemd/system/prefixd.service"
[ -e "$dest/etc/prefixd/prefixd.toml" ] || install -m 0644 "$here/prefixd.toml" "$dest/etc/prefixd/prefixd.toml"
"$from/prefixctl" completions bash > "$dest$prefix/share/bash-completion/completions/prefixctl"
"$from/prefixctl" completions zsh > "$dest$prefix/share/zsh/site-functions/_prefixctl"
"$from/prefixctl" completions fish > "$dest$prefix/share/fish/vendor_completions.d/prefixctl.fish"
"$from/prefixctl" man "$dest$prefix/share/man/man1" > /dev/null
echo "installed prefixd and prefixctl under $dest$prefix; unit: $dest/etc/systemd/system/prefixd.service"
