#!/usr/bin/env bash
# Check the volumes of a split gpustack-offline bundle, then unpack it or rebuild its tar.
# Needs only bash, coreutils (sha256sum, stat, df, tee, mkfifo, wc), find and GNU tar: it runs
# on the air-gapped target as it comes off the media.
#
# Every volume's size and sha256 are checked against the volume manifest (<cell>.volumes) first,
# and every missing, truncated or altered volume is named; nothing is written until all are
# intact. The joined stream's sha256 is then checked against the manifest while it is written,
# and a join that does not match leaves no final folder or file behind. Nor does a stream that
# holds anything a bundle never has (an absolute or '..' name, a symlink, a hard link, a device
# or a FIFO): each such member is named and the unpacked copy is removed.
set -euo pipefail

FORMAT="gpustack-offline-volumes 1"
PROG=${0##*/}
shopt -s nullglob dotglob

usage() {
    cat <<EOF
usage: bash $PROG [--check-only] [--extract DIR | --output FILE [--consume]] VOLUMES_FILE

  VOLUMES_FILE     the <cell>.volumes manifest; the volumes are read from its folder
  --check-only     check every volume's size and sha256, write nothing
  --extract DIR    unpack the bundle into DIR (the default, DIR = the current folder). The
                   volumes stream straight into tar: no joined tar is written, so the only
                   disk used is the unpacked bundle (run it on the media itself to copy nothing)
  --output FILE    rebuild the tar as FILE instead
  --consume        with --output: delete each volume once it is appended, so the rebuild needs
                   room for one more volume, not a second copy (use it on copies of the volumes,
                   never on the only ones)
EOF
}

die() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 1
}

mode=extract target=. check_only=0 consume=0 manifest=
while (($#)); do
    case $1 in
    --check-only) check_only=1 ;;
    --extract | --output)
        (($# >= 2)) || die "$1 needs a value; see --help"
        mode=${1#--} target=$2
        shift
        ;;
    --consume) consume=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    -*) die "unknown option $1; see --help" ;;
    *)
        [[ -z $manifest ]] || die "one VOLUMES_FILE only (got $manifest and $1); see --help"
        manifest=$1
        ;;
    esac
    shift
done
[[ -n $manifest ]] || {
    usage >&2
    exit 2
}
((consume == 0)) || [[ $mode == output ]] || die "--consume goes with --output FILE only"
[[ -f $manifest ]] || die "$manifest not found: give the <cell>.volumes file from the media"

# --- read the manifest --------------------------------------------------------------------------

src_dir=$(cd -- "$(dirname -- "$manifest")" && pwd)
tar_sha='' tar_size='' tar_name='' end_count=''
names=() sizes=() sums=()
line_no=0
valid_name='^[A-Za-z0-9._+-]+$'
valid_sum='^[0-9a-f]{64}$'
while IFS= read -r line || [[ -n $line ]]; do
    line_no=$((line_no + 1))
    line=${line%$'\r'}
    if ((line_no == 1)); then
        [[ $line == "$FORMAT" ]] ||
            die "$manifest is not a volume manifest of this format (first line is not '$FORMAT')"
        continue
    fi
    [[ -z $line || $line == '#'* ]] && continue
    [[ -z $end_count ]] || die "$manifest line $line_no: text after the end line"
    read -r kind sum size name rest <<<"$line"
    if [[ $kind == end ]]; then
        [[ $sum =~ ^[0-9]+$ ]] || die "$manifest line $line_no: bad end line"
        end_count=$sum
        continue
    fi
    [[ $sum =~ $valid_sum && $size =~ ^[0-9]+$ && $name =~ $valid_name && -z $rest &&
        $name != . && $name != .. ]] || die "$manifest line $line_no is malformed: $line"
    case $kind in
    tar) tar_sha=$sum tar_size=$size tar_name=$name ;;
    volume) names+=("$name") sizes+=("$size") sums+=("$sum") ;;
    *) die "$manifest line $line_no: unknown kind '$kind'" ;;
    esac
done <"$manifest"
[[ -n $end_count ]] ||
    die "$manifest is incomplete (no end line): copy <cell>.volumes from the media again"
[[ -n $tar_name ]] || die "$manifest names no tar"
((${#names[@]} == end_count)) ||
    die "$manifest lists ${#names[@]} volumes but its end line says $end_count: copy it again"
((${#names[@]} > 0)) || die "$manifest lists no volumes"
listed=0
for size in "${sizes[@]}"; do listed=$((listed + size)); done
((listed == tar_size)) ||
    die "$manifest: the volumes add up to $listed bytes, the tar is $tar_size: copy it again"

# --- check every volume before writing anything -------------------------------------------------

count=${#names[@]}
echo "checking $count volume(s) of $tar_name in $src_dir"
bad=()
for i in "${!names[@]}"; do
    name=${names[i]} path=$src_dir/${names[i]}
    if [[ ! -f $path ]]; then
        bad+=("$name")
        echo "  MISSING    $name: not in $src_dir" >&2
        continue
    fi
    have=$(stat -c %s -- "$path")
    if ((have < sizes[i])); then
        bad+=("$name")
        echo "  TRUNCATED  $name: $have of ${sizes[i]} bytes" >&2
        continue
    elif ((have > sizes[i])); then
        bad+=("$name")
        echo "  TOO LONG   $name: $have bytes, expected ${sizes[i]}" >&2
        continue
    fi
    sum=$(sha256sum <"$path")
    if [[ ${sum%% *} != "${sums[i]}" ]]; then
        bad+=("$name")
        echo "  ALTERED    $name: sha256 ${sum%% *}, expected ${sums[i]}" >&2
        continue
    fi
    echo "  ok         $name"
done
# Another volume of the same tar beside these is not used; say so, it hints at mixed sets.
for path in "$src_dir/$tar_name".*; do
    [[ -f $path && ${path##*.} =~ ^[0-9]+$ ]] || continue
    extra=${path##*/} known=0
    for name in "${names[@]}"; do [[ $name == "$extra" ]] && known=1; done
    ((known)) || echo "  note: $extra is not listed in ${manifest##*/}; it is ignored" >&2
done
if ((${#bad[@]})); then
    echo "$PROG: ${#bad[@]} of $count volume(s) missing or damaged: ${bad[*]}" >&2
    echo "$PROG: re-copy each of them from the source media (or split the bundle again), then" \
        "run this again" >&2
    exit 1
fi
echo "all $count volume(s) intact ($tar_size bytes)"
((check_only == 0)) || exit 0

paths=()
for name in "${names[@]}"; do paths+=("$src_dir/$name"); done

# --- free space ---------------------------------------------------------------------------------

free_bytes() { df -P -B1 -- "$1" | tail -n 1 | (read -r _ _ _ avail _ && echo "$avail"); }
device_of() { stat -c %d -- "$1"; }

hint=
if [[ $mode == extract ]]; then
    out_dir=$target
    while [[ ! -e $out_dir ]]; do out_dir=$(dirname -- "$out_dir"); done # made after the checks
    [[ -d $out_dir ]] || die "--extract $target: $out_dir is not a folder"
    top=${tar_name%.tar}
    [[ ! -e $target/$top ]] || die "$target/$top exists: remove it or give another --extract DIR"
    need=$tar_size why="the unpacked bundle (about the tar's size)"
else
    [[ ! -d $target ]] || die "--output $target is a folder; give the file name of the tar"
    [[ -d $(dirname -- "$target") ]] || die "--output $target: its folder does not exist"
    out_dir=$(cd -- "$(dirname -- "$target")" && pwd)
    target=$out_dir/${target##*/}
    need=$tar_size why="the rebuilt tar"
    ((consume == 0)) || [[ -w $src_dir ]] ||
        die "--consume deletes each volume once appended, but $src_dir is read-only:" \
            "copy the volumes to this disk first, or leave out --consume"
    largest=0
    for size in "${sizes[@]}"; do ((size <= largest)) || largest=$size; done
    if [[ $(device_of "$out_dir") == "$(device_of "$src_dir")" ]]; then
        if ((consume)); then
            need=$largest why="the largest volume (--consume deletes each volume once appended)"
        else
            hint="add --consume (deletes each volume once appended) to need only $largest bytes, "
        fi
    fi
fi
free=$(free_bytes "$out_dir")
((free >= need)) ||
    die "not enough space in $out_dir: $free bytes free, $need needed for $why;" \
        "${hint}free $((need - free)) more bytes or choose a folder on another disk"

# --- refusing what a bundle never holds ----------------------------------------------------------

# A bundle tar (bundle.write_tar) holds regular files and folders under relative names only.
refuse_members() {
    echo "$PROG: $tar_name holds $1 member(s) a bundle never has (listed above):" \
        "nothing was kept; the bundle is damaged or hostile, build or copy it again from its" \
        "source" >&2
    exit 1
}

# Names every member of the listings that is not a plain file or folder with a relative name
# free of '..' (names are shown as tar quotes them: one line each).
check_members() {
    wait "$lister" || die "tar could not list the joined volumes: $(<"$work/names.err")"
    wait "$typer" || die "tar could not list the joined volumes: $(<"$work/types.err")"
    local name long kind why refused=0 names types
    names=$(wc -l <"$work/names.txt") types=$(wc -l <"$work/types.txt")
    ((names == types)) ||
        die "tar listed $names names but $types entries in the joined volumes; nothing was kept"
    while IFS= read -r name <&6; do
        IFS= read -r long <&7 || long='?'
        case ${long:0:1} in
        - | d) kind= ;;
        l) kind="symlink" ;;
        h) kind="hard link" ;;
        c) kind="character device" ;;
        b) kind="block device" ;;
        p) kind="FIFO (named pipe)" ;;
        *) kind="entry of type '${long:0:1}'" ;;
        esac
        why=
        if [[ $name == /* ]]; then
            why="absolute name"
        elif [[ /$name/ == */../* ]]; then
            why="'..' in the name leads outside the folder"
        fi
        [[ -z $kind ]] || why=${why:+$why, }$kind
        [[ -n $why ]] || continue
        refused=$((refused + 1))
        echo "  REFUSED    $name: $why" >&2
    done 6<"$work/names.txt" 7<"$work/types.txt"
    ((refused == 0)) || refuse_members "$refused"
}

# What tar actually wrote, in case a listing missed something: files and folders only.
check_unpacked() {
    local entry refused=0
    while IFS= read -r -d '' entry; do
        refused=$((refused + 1))
        echo "  REFUSED    ${entry#"$part"/}: not a file or folder once unpacked" >&2
    done < <(find "$part" -mindepth 1 ! -type f ! -type d -print0)
    ((refused == 0)) || refuse_members "$refused"
}

# --- join, hashing the stream on the way --------------------------------------------------------

work=$(mktemp -d)
part=
cleanup() {
    [[ -z $part ]] || rm -rf -- "$part"
    rm -rf -- "$work"
}
trap cleanup EXIT
mkfifo "$work/stream"
sha256sum <"$work/stream" >"$work/sum" &
hasher=$!
exec 3>"$work/stream"

untar=0
if [[ $mode == extract ]]; then
    mkdir -p -- "$target"
    out_dir=$(cd -- "$target" && pwd)
    part=$(mktemp -d "$out_dir/.$top.join.XXXXXX")
    echo "unpacking into $out_dir"
    # The same stream is listed as it is unpacked: names as stored (-P: GNU tar would strip a
    # leading / or skip a '..' member with a mere warning) and, line for line, their types.
    mkfifo "$work/names" "$work/types"
    tar -t -P -f - <"$work/names" >"$work/names.txt" 2>"$work/names.err" &
    lister=$!
    tar -t -v -P --numeric-owner -f - <"$work/types" >"$work/types.txt" 2>"$work/types.err" &
    typer=$!
    exec 4>"$work/names" 5>"$work/types"
    # tee -p keeps hashing (and listing) to the end if a tar stops reading early.
    cat -- "${paths[@]}" | tee -p /dev/fd/3 /dev/fd/4 /dev/fd/5 | tar -x -f - -C "$part" ||
        untar=$?
    exec 4>&- 5>&-
else
    part=$(mktemp "$out_dir/.${target##*/}.join.XXXXXX")
    chmod "$(printf '%04o' $((0666 & ~0$(umask))))" -- "$part"
    echo "rebuilding $target"
    for i in "${!paths[@]}"; do
        sum=$(tee -a -- "$part" /dev/fd/3 <"${paths[i]}" | sha256sum) ||
            die "could not append ${names[i]} to $part (is the disk full?); nothing was kept"
        [[ ${sum%% *} == "${sums[i]}" ]] ||
            die "${names[i]} changed while it was read; re-copy it from the media, then run again"
        if ((consume)); then
            sync -- "$part"
            rm -f -- "${paths[i]}"
        fi
    done
fi
exec 3>&-
wait "$hasher"
sum=$(<"$work/sum")
if [[ ${sum%% *} != "$tar_sha" ]]; then
    die "the joined volumes have sha256 ${sum%% *}, the manifest says $tar_sha: nothing was kept;" \
        "copy ${manifest##*/} and its volumes from the media again"
fi

if [[ $mode == extract ]]; then
    check_members
    ((untar == 0)) || die "tar could not unpack the joined volumes; nothing was kept"
    check_unpacked
    for entry in "$part"/*; do
        [[ ! -e $out_dir/${entry##*/} ]] || die "$out_dir/${entry##*/} exists: remove it and run again"
    done
    for entry in "$part"/*; do
        mv -- "$entry" "$out_dir/"
    done
    echo "unpacked $tar_name into $out_dir (sha256 $tar_sha)"
else
    sync -- "$part"
    mv -f -- "$part" "$target"
    part=
    echo "rebuilt $target (sha256 $tar_sha)"
fi
