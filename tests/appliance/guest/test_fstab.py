"""The one fstab parser: the odd lines of real guests' fstabs read as mount(8) reads them, as both the
static validation (linux) and the guest mounts (mount) rely on."""

from __future__ import annotations

from appliance.guest.fstab import parse_fstab


def rows(text: str) -> list[tuple[str, str, str, list[str]]]:
    return [(e.spec, e.mountpoint, e.fstype, e.options) for e in parse_fstab(text)]


def test_fstab_parser_decodes_escapes_and_skips_comments() -> None:
    entries = parse_fstab("# c\n\nUUID=abc /mnt/my\\040disk ext4 ro,nofail 0 2\nLABEL=x /\nbroken\n")
    assert [(e.spec, e.mountpoint, e.fstype, e.options) for e in entries] == [
        ("UUID=abc", "/mnt/my disk", "ext4", ["ro", "nofail"]),
        ("LABEL=x", "/", "auto", ["defaults"]),
    ]


def test_tabs_and_runs_of_blanks_separate_fields_and_indented_comments_are_comments() -> None:
    text = (
        "UUID=0a1b\t/\t\text4\terrors=remount-ro\t0\t1\n   # indented\n\t\n/dev/sda2   /home  xfs  defaults\n"
    )
    assert rows(text) == [
        ("UUID=0a1b", "/", "ext4", ["errors=remount-ro"]),
        ("/dev/sda2", "/home", "xfs", ["defaults"]),
    ]


def test_missing_type_and_options_default_and_a_lone_device_is_skipped() -> None:
    assert rows("LABEL=data /data\nUUID=1 /srv ext4\n/dev/vdb\n") == [
        ("LABEL=data", "/data", "auto", ["defaults"]),
        ("UUID=1", "/srv", "ext4", ["defaults"]),
    ]


def test_swap_bind_and_virtual_filesystems_are_entries_their_callers_tell_apart() -> None:
    text = (
        "UUID=5w4p none swap sw 0 0\n"
        "/srv/data /var/www none bind,ro 0 0\n"
        "proc /proc proc defaults 0 0\n"
        "PARTUUID=aa-01 /boot/efi vfat umask=0077,shortname=winnt 0 2\n"
    )
    assert rows(text) == [
        ("UUID=5w4p", "none", "swap", ["sw"]),
        ("/srv/data", "/var/www", "none", ["bind", "ro"]),
        ("proc", "/proc", "proc", ["defaults"]),
        ("PARTUUID=aa-01", "/boot/efi", "vfat", ["umask=0077", "shortname=winnt"]),
    ]


def test_escapes_are_decoded_in_every_field_and_dump_pass_and_extra_fields_ignored() -> None:
    text = "LABEL=my\\040root /mnt/a\\011b btrfs subvol=@home,compress=zstd 0 0 trailing junk\n"
    assert rows(text) == [("LABEL=my root", "/mnt/a\tb", "btrfs", ["subvol=@home", "compress=zstd"])]
