#!/usr/bin/env bash
# Builds Hostvisor's default guest: a Debian kernel plus a busybox initramfs.
#
#   scripts/make-default-guest.sh [OUTDIR]            cloud kernel (linux-image-cloud-amd64), default .cache/guest
#   scripts/make-default-guest.sh --generic [OUTDIR]  generic kernel (linux-image-amd64), default .cache/guest-generic
#   scripts/make-default-guest.sh --i386 [OUTDIR]     32-bit kernel (linux-image-686) and i386 busybox, default .cache/guest-686
#
# Produces in OUTDIR:
#   vmlinuz             the kernel (bzImage) from the Debian package
#   kernel-version      its version string (e.g. 6.1.0-57-cloud-amd64)
#   initramfs.cpio.gz   busybox-static userland (i386 for --i386); /init prints HOSTVISOR-GUEST-READY then runs a shell
#                       on the console; the virtio, e1000, 8139too/8139cp, evdev (and ext2/ext4 when modular) modules live under
#                       /lib/modules/VERSION with a modules.dep made by busybox depmod
#   modules/            the package's whole lib/modules tree, for later disk images
#
# Nothing is installed into the host: the kernel package is fetched with `apt-get download` and
# unpacked with `dpkg-deb -x` (--i386 adds the i386 architecture to dpkg once). Does nothing when the outputs are newer than this script and the
# init script. Works as root on a fresh Debian 12; as another user it needs the tools already present.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
init_script="$script_dir/initramfs/init"
dhcp_script="$script_dir/initramfs/udhcpc.script"

meta_package=linux-image-cloud-amd64
default_outdir="$repo_root/.cache/guest"
guest_busybox_package=""
case "${1:-}" in
  --generic)
    meta_package=linux-image-amd64
    default_outdir="$repo_root/.cache/guest-generic"
    shift
    ;;
  --i386)
    meta_package=linux-image-686:i386
    guest_busybox_package=busybox-static:i386
    default_outdir="$repo_root/.cache/guest-686"
    shift
    ;;
esac
case "${1:-}" in
  -h | --help)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  -*)
    echo "make-default-guest: unknown option '$1' (try --help)" >&2
    exit 2
    ;;
esac
outdir=${1:-$default_outdir}

fail() {
  echo "make-default-guest: $*" >&2
  exit 1
}

is_fresh() {
  local file
  for file in vmlinuz initramfs.cpio.gz kernel-version; do
    [ -s "$outdir/$file" ] || return 1
    [ "$outdir/$file" -nt "$0" ] || return 1
    [ "$outdir/$file" -nt "$init_script" ] || return 1
    [ "$outdir/$file" -nt "$dhcp_script" ] || return 1
  done
}

if is_fresh; then exit 0; fi

[ -f "$init_script" ] || fail "missing $init_script"
"$script_dir/install-deps.sh"
for tool in apt-get apt-cache dpkg-deb cpio gzip flock; do
  command -v "$tool" >/dev/null 2>&1 || fail "'$tool' is required"
done
busybox=""
for candidate in /bin/busybox /usr/bin/busybox; do
  if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
    busybox=$candidate
    break
  fi
done
[ -n "$busybox" ] || fail "a statically linked busybox is required (apt-get install busybox-static)"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
# Concurrent builds (parallel test runs) wait for each other; the second one finds fresh outputs.
exec 9>"$outdir/.lock"
flock 9
if is_fresh; then exit 0; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hostvisor-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Refreshes apt's package lists, trying again while a mirror is in the middle of a sync
# ("File has unexpected size"); after three tries it goes on with the lists it has.
refresh_package_lists() {
  for attempt in 1 2 3; do
    as_root apt-get update -qq && return 0
    [ "$attempt" = 3 ] || { echo "make-default-guest: apt-get update failed, trying again in 20 s" >&2; sleep 20; }
  done
  echo "make-default-guest: apt-get update still fails; going on with the package lists it has" >&2
}

# The versioned kernel package the meta package points at, e.g. linux-image-6.1.0-57-cloud-amd64.
kernel_package_of() {
  apt-cache depends "$meta_package" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

if [ -n "$guest_busybox_package" ] && ! dpkg --print-foreign-architectures | grep -qx i386; then
  echo "make-default-guest: adding the i386 architecture to dpkg (for the 32-bit guest's packages)" >&2
  as_root dpkg --add-architecture i386
  refresh_package_lists
fi
kernel_package=$(kernel_package_of || true)
if [ -z "$kernel_package" ]; then
  echo "make-default-guest: refreshing the apt package lists" >&2
  refresh_package_lists
  kernel_package=$(kernel_package_of || true)
fi
[ -n "$kernel_package" ] || fail "cannot find the kernel package that $meta_package depends on"

mkdir -p "$work/download"
# apt drops privileges to _apt for downloads; let it write there.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
  chmod 755 "$work"
  chown _apt "$work/download"
fi
if ! (cd "$work/download" && apt-get download -qq "$kernel_package" >/dev/null); then
  echo "make-default-guest: download failed, refreshing the apt package lists and retrying" >&2
  refresh_package_lists
  (cd "$work/download" && apt-get download -qq "$kernel_package" >/dev/null) ||
    fail "cannot download $kernel_package"
fi
deb=$(ls "$work"/download/*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || fail "apt-get download produced no package for $kernel_package"

dpkg-deb -x "$deb" "$work/pkg"

# The guest's own busybox when its architecture differs from the host's (the host's static
# busybox still runs depmod and lists the applets: same Debian version, same configuration).
guest_busybox=$busybox
if [ -n "$guest_busybox_package" ]; then
  mkdir -p "$work/busybox-download"
  [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1 && chown _apt "$work/busybox-download"
  (cd "$work/busybox-download" && apt-get download -qq "$guest_busybox_package" >/dev/null) ||
    fail "cannot download $guest_busybox_package"
  dpkg-deb -x "$(ls "$work"/busybox-download/*.deb | head -n 1)" "$work/busybox-pkg"
  guest_busybox="$work/busybox-pkg/bin/busybox"
  [ -x "$guest_busybox" ] || fail "$guest_busybox_package contains no bin/busybox"
fi
kernel_image=$(ls "$work"/pkg/boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$kernel_image" ] || fail "$kernel_package contains no boot/vmlinuz-*"
version=${kernel_image##*/vmlinuz-}
modules_root="$work/pkg/lib/modules/$version"
[ -d "$modules_root" ] || fail "$kernel_package contains no lib/modules/$version"

# busybox modprobe reads plain .ko files only: decompress any .ko.xz / .ko.zst / .ko.gz.
while IFS= read -r -d '' module; do
  case "$module" in
    *.ko.xz) xz -dq "$module" ;;
    *.ko.zst) zstd -dq --rm "$module" ;;
    *.ko.gz) gzip -dq "$module" ;;
  esac
done < <(find "$modules_root" -name '*.ko.*' -print0)
# The package ships no modules.dep (its postinst runs depmod); make one for the whole tree.
"$busybox" depmod -b "$work/pkg" "$version"

# --- initramfs staging tree -------------------------------------------------------------------
stage="$work/stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt,lib/modules}
chmod 1777 "$stage/tmp"
cp "$guest_busybox" "$stage/bin/busybox"
chmod 755 "$stage/bin/busybox"
while IFS= read -r applet; do
  [ -n "$applet" ] || continue
  [ "$applet" = "bin/busybox" ] && continue
  [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)
cp "$init_script" "$stage/init"
chmod 755 "$stage/init"
mkdir -p "$stage/usr/share/udhcpc" "$stage/etc/udhcpc"
cp "$dhcp_script" "$stage/usr/share/udhcpc/default.script"
chmod 755 "$stage/usr/share/udhcpc/default.script"
# Debian's busybox looks in /etc/udhcpc, upstream's in /usr/share/udhcpc.
ln -s /usr/share/udhcpc/default.script "$stage/etc/udhcpc/default.script"
echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
echo "root:x:0:" >"$stage/etc/group"
echo "hostvisor" >"$stage/etc/hostname"
# The kernel opens /dev/console for PID 1 before /init mounts devtmpfs.
if [ "$(id -u)" = 0 ]; then mknod -m 600 "$stage/dev/console" c 5 1; fi

# Modules: the virtio drivers (virtio_input among them), the emulated NICs' drivers (e1000, 8139too; 8139cp for QEMU's RTL8139C+),
# evdev for /dev/input/event*, ext2/ext4 when they are modules, and everything they depend on.
wanted_modules=$(
  cd "$modules_root" &&
    find kernel/drivers/virtio kernel/drivers/block/virtio_blk.ko kernel/drivers/net/virtio_net.ko \
      kernel/drivers/char/virtio_console.ko kernel/drivers/char/hw_random/virtio-rng.ko \
      kernel/drivers/net/ethernet/intel/e1000 kernel/drivers/net/ethernet/realtek/8139too.ko \
      kernel/drivers/net/ethernet/realtek/8139cp.ko kernel/drivers/input/evdev.ko kernel/fs/ext2 kernel/fs/ext4 -name '*.ko' 2>/dev/null || true
)
[ -n "$wanted_modules" ] || echo "make-default-guest: note: $version has no virtio modules (built in?)" >&2
module_closure=$(
  awk -v wanted="$wanted_modules" '
    BEGIN { n = split(wanted, list, "\n"); for (i = 1; i <= n; i++) if (list[i] != "") need[list[i]] = 1 }
    { name = $1; sub(/:$/, "", name); deps[name] = ""; for (i = 2; i <= NF; i++) deps[name] = deps[name] " " $i }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (m in need) {
          k = split(deps[m], d, " ")
          for (i = 1; i <= k; i++) if (!(d[i] in need)) { need[d[i]] = 1; changed = 1 }
        }
      }
      for (m in need) print m
    }' "$modules_root/modules.dep" | sort
)
stage_modules="$stage/lib/modules/$version"
mkdir -p "$stage_modules"
for module in $module_closure; do
  mkdir -p "$stage_modules/$(dirname "$module")"
  cp "$modules_root/$module" "$stage_modules/$module"
done
for file in modules.builtin modules.builtin.modinfo modules.order; do
  [ -f "$modules_root/$file" ] && cp "$modules_root/$file" "$stage_modules/"
done
"$busybox" depmod -b "$stage" "$version"

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9n >"$work/initramfs.cpio.gz"

# --- publish ------------------------------------------------------------------------------------
rm -rf "$outdir/modules.new"
mkdir -p "$outdir/modules.new"
cp -a "$work/pkg/lib/modules/." "$outdir/modules.new/"
rm -rf "$outdir/modules"
mv "$outdir/modules.new" "$outdir/modules"
cp "$kernel_image" "$outdir/vmlinuz.new" && mv "$outdir/vmlinuz.new" "$outdir/vmlinuz"
mv "$work/initramfs.cpio.gz" "$outdir/initramfs.cpio.gz"
echo "$version" >"$outdir/kernel-version.new" && mv "$outdir/kernel-version.new" "$outdir/kernel-version"
echo "make-default-guest: $outdir: kernel $version ($kernel_package), initramfs with $(echo "$module_closure" | grep -c .) modules"
