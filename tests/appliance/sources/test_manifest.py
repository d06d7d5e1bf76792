"""The EC2 import manifest (appliance.sources.manifest): parsing what AWS documents and what euca2ools
writes, and refusing what is malformed. Waiting and downloading are in test_parts."""

from __future__ import annotations

import pytest

from appliance.sources.manifest import (
    ManifestInvalid,
    Part,
    build_manifest,
    parse_manifest,
    plan_parts,
)

MiB = 2**20

AWS_SAMPLE = b"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<manifest>
  <version>2010-11-15</version>
  <file-format>VMDK</file-format>
  <importer>
    <name>ec2-upload-disk-image</name>
    <version>1.0.0</version>
    <release>2010-11-15</release>
  </importer>
  <self-destruct-url>https://s3.amazonaws.com/bucket/a3a5e1b6-590d-43cc-97c1-15c7325d3f41/Win_2008_Server_Data_Center_SP2_32-bit.vmdkmanifest.xml?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</self-destruct-url>
  <import>
    <size>12595200</size>
    <volume-size>1</volume-size>
    <parts count="2">
      <part index="0">
        <byte-range end="10485759" start="0"/>
        <key>a3a5e1b6-590d-43cc-97c1-15c7325d3f41/Win_2008_Server_Data_Center_SP2_32-bit.vmdk.part0</key>
        <head-url>https://s3.amazonaws.com/bucket/part0?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</head-url>
        <get-url>https://s3.amazonaws.com/bucket/part0?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</get-url>
        <delete-url>https://s3.amazonaws.com/bucket/part0?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</delete-url>
      </part>
      <part index="1">
        <byte-range end="12595199" start="10485760"/>
        <key>a3a5e1b6-590d-43cc-97c1-15c7325d3f41/Win_2008_Server_Data_Center_SP2_32-bit.vmdk.part1</key>
        <head-url>https://s3.amazonaws.com/bucket/part1?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</head-url>
        <get-url>https://s3.amazonaws.com/bucket/part1?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</get-url>
        <delete-url>https://s3.amazonaws.com/bucket/part1?AWSAccessKeyId=AKIADQKE4SARGYLE&amp;Expires=1294855591&amp;Signature=5snej01TlTtL0uR7KExtEXAMPLE%3D</delete-url>
      </part>
    </parts>
  </import>
</manifest>
"""


def manifest_xml(
    *,
    size: int = 300,
    ranges: list[tuple[int, int]] | None = None,
    count: int | None = None,
    indices: list[int] | None = None,
    file_format: str = "RAW",
    extra_import: str = "",
    part_extra: str = "<head-url>http://8.8.8.8/h</head-url><get-url>http://8.8.8.8/g</get-url>",
) -> bytes:
    ranges = ranges if ranges is not None else [(0, 99), (100, 199), (200, 299)]
    indices = indices if indices is not None else list(range(len(ranges)))
    parts = "".join(
        f'<part index="{i}"><byte-range start="{s}" end="{e}"/><key>k{i}</key>{part_extra}</part>'
        for i, (s, e) in zip(indices, ranges, strict=True)
    )
    return (
        f"<manifest><version>2010-11-15</version><file-format>{file_format}</file-format>"
        f"<import><size>{size}</size><volume-size>1</volume-size>{extra_import}"
        f'<parts count="{len(ranges) if count is None else count}">{parts}</parts></import></manifest>'
    ).encode()


# ---------------------------------------------------------------------------------------------- parse


def test_parses_the_aws_sample() -> None:
    m = parse_manifest(AWS_SAMPLE)
    assert (m.version, m.file_format, m.size, m.volume_size) == ("2010-11-15", "VMDK", 12595200, 1)
    assert m.importer is not None and m.importer.name == "ec2-upload-disk-image"
    assert [(p.index, p.start, p.end, p.length) for p in m.parts] == [
        (0, 0, 10485759, 10485760),
        (1, 10485760, 12595199, 2109440),
    ]
    assert m.parts[1].get_url.count("&Expires=") == 1  # &amp; unescaped
    assert m.self_destruct_url and m.self_destruct_url.startswith("https://s3.amazonaws.com/bucket/")


def test_tolerates_the_aws_sample_whose_last_part_ends_at_size() -> None:
    m = parse_manifest(manifest_xml(size=994433536, ranges=[(0, 994433536)]))
    assert m.parts[0].end == 994433535 and m.parts[0].length == 994433536


def test_a_part_of_at_most_1_gib_is_taken_and_a_larger_one_refused_before_anything_is_fetched() -> None:
    # each part is held in memory until its MD5 checks out: a manifest cannot make the task allocate more
    gib = 1 << 30
    m = parse_manifest(manifest_xml(size=2 * gib, ranges=[(0, gib - 1), (gib, 2 * gib - 1)]))
    assert [p.length for p in m.parts] == [gib, gib]
    with pytest.raises(ManifestInvalid) as err:
        parse_manifest(manifest_xml(size=3 * gib, ranges=[(0, gib - 1), (gib, 3 * gib - 1)]))
    assert "part 1 is 2147483648 bytes: a part may hold at most 1073741824" in err.value.message


def test_parses_what_euca2ools_writes() -> None:
    parts = [
        Part(
            i,
            s,
            e,
            f"pre/u/disk.raw.part.{i}",
            f"http://8.8.8.8/h{i}?a=1&b=2",
            f"http://8.8.8.8/g{i}",
            f"http://8.8.8.8/d{i}",
        )
        for i, s, e in plan_parts(25 * MiB + 5)
    ]
    data = build_manifest(
        file_format="RAW",
        size=25 * MiB + 5,
        volume_size=1,
        parts=parts,
        self_destruct_url="http://8.8.8.8/m?x=1&y=2",
    )
    assert data.startswith(
        b"<?xml version='1.0' encoding='UTF-8' standalone='yes'?>\n<manifest><version>2010-11-15"
    )
    assert b"<importer><name>euca2ools</name><version>3.4.1</version><release>0</release></importer>" in data
    assert b"x=1&amp;y=2" in data
    m = parse_manifest(data)
    assert m.parts == parts
    assert [p.length for p in m.parts] == [10 * MiB, 10 * MiB, 5 * MiB + 5]
    assert m.self_destruct_url == "http://8.8.8.8/m?x=1&y=2"
    pretty = build_manifest(
        file_format="RAW",
        size=25 * MiB + 5,
        volume_size=1,
        parts=parts,
        self_destruct_url="u",
        pretty_print=True,
    )
    assert b"\n  <file-format>RAW</file-format>" in pretty
    assert parse_manifest(pretty).parts == parts


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<manifest><version>&lol2;</version></manifest>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE m [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><manifest><version>&xxe;</version></manifest>"""


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not xml", "not well-formed"),
        (BILLION_LAUGHS, "forbidden XML"),
        (EXTERNAL_ENTITY, "forbidden XML"),
        (b"<import/>", "not <manifest>"),
        (manifest_xml(file_format="QCOW2"), "file-format must be one of RAW, VHD, VMDK"),
        (manifest_xml().replace(b"<file-format>RAW</file-format>", b""), "file-format is missing"),
        (manifest_xml(size=0, ranges=[(0, 0)]), "size must be greater than 0"),
        (manifest_xml(size=-5, ranges=[(0, 0)]), "import/size must be a non-negative integer"),
        (manifest_xml(extra_import="<size>300</size>"), "size appears 2 times"),
        (manifest_xml(count=4), "count is 4 but the manifest lists 3 parts"),
        (manifest_xml(count=0, ranges=[]), "at least one"),
        (manifest_xml(indices=[0, 2, 3]), "index out of range"),
        (manifest_xml(indices=[0, 1, 1]), "appears more than once"),
        (manifest_xml(ranges=[(0, 99), (101, 199), (200, 299)]), "leaves a gap"),
        (manifest_xml(ranges=[(0, 99), (99, 199), (200, 299)]), "overlaps"),
        (manifest_xml(ranges=[(0, 99), (100, 98), (99, 299)]), "ends (byte 98) before it starts"),
        (
            manifest_xml(ranges=[(0, 99), (100, 199), (200, 298)]),
            "cover 299 bytes but manifest/import/size is 300",
        ),
        (manifest_xml(ranges=[(0, 300), (301, 400)], size=300), "beyond the file size"),
        (manifest_xml(ranges=[(10, 299)]), "starts at byte 10"),
        (
            manifest_xml(size=3 << 30, ranges=[(0, (1 << 30) - 1), (1 << 30, (3 << 30) - 1)]),
            "at most 1073741824",
        ),
        (
            manifest_xml(ranges=[(0, 299)], size=300).replace(b'start="0"', b'start="zero"'),
            "byte-range@start",
        ),
        (manifest_xml(part_extra="<head-url>http://8.8.8.8/h</head-url>"), "part 0/get-url is missing"),
    ],
)
def test_rejects_invalid_manifests(data: bytes, fragment: str) -> None:
    with pytest.raises(ManifestInvalid) as err:
        parse_manifest(data)
    assert err.value.code == "ManifestInvalid"
    assert fragment in err.value.message
