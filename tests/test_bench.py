"""The benchmark's arithmetic and report, without sockets or Docker (the measuring itself runs in
`nox -s bench`, against a loopback registry and the real engine); and the 2.x measurement (one
archive per image against ours) on two tiny runners, against the loopback hub and real skopeo."""

from __future__ import annotations

import os
from pathlib import Path

import bench
import pytest
from support.gpustack2_images import push_images, runner_images
from support.registry_fixture import AMD64, Hub

from gpustack_offline.stages.registry import Descriptor, Image, Platform, Reference

FACTS = bench.HostFacts(
    date="2025-01-02",
    cpus=2,
    docker="20.10.24",
    system="Linux 6.1 x86_64",
    load="1.50 / 1.00 / 0.50",
)


def _desc(name: str, size: int) -> Descriptor:
    return Descriptor("application/octet-stream", "sha256:" + name * 64, size)


def _image(tag: str, manifest: str, config: str, layers: list[tuple[str, int]]) -> Image:
    return Image(
        Reference.parse(f"127.0.0.1:5000/gpustack/gpustack:{tag}"),
        Platform("linux", "amd64"),
        "sha256:" + "f" * 64,
        _desc(manifest, 500),
        _desc(config, 100),
        tuple(_desc(n, s) for n, s in layers),
    )


def _row(name: str = "set, cold", naive: int = 900, ours: int = 300) -> bench.Row:
    return bench.Row(
        name,
        bench.Measurement(naive, 12.0, 9.0, 4),
        bench.Measurement(ours, 4.0, 1.0, 0),
        floor=290,
    )


def test_ratio_is_naive_over_ours() -> None:
    assert bench.ratio(900, 300) == pytest.approx(3.0)
    assert bench.ratio(1.5, 3.0) == pytest.approx(0.5)  # ours slower: below 1


def test_ratio_with_nothing_to_divide_by_is_none_not_infinity() -> None:
    assert bench.ratio(5, 0) is None
    assert bench.ratio(0.0, 0.0) is None


def test_row_ratios_cover_bytes_and_seconds() -> None:
    row = _row()
    assert row.bytes_ratio == pytest.approx(3.0)
    assert row.seconds_ratio == pytest.approx(3.0)


def test_unique_bytes_counts_a_shared_blob_once() -> None:
    base = ("a", 100_000)
    images = [
        _image("v0.7.1", "1", "2", [base, ("b", 5_000)]),
        _image("v0.7.1-cpu", "3", "4", [base, ("c", 1_000)]),
    ]
    assert bench.unique_bytes(images) == 100_000 + 5_000 + 1_000 + 2 * (500 + 100)
    assert bench.unique_bytes(images[:1] * 3) == 100_000 + 5_000 + 500 + 100


def test_targets_group_by_platform_in_first_seen_order() -> None:
    t = [
        bench.Target("r/x:a", "linux/arm64"),
        bench.Target("r/x:a", "linux/amd64"),
        bench.Target("r/x:b", "linux/arm64/v8"),
    ]
    groups = bench.by_platform(t)
    assert [name for name, _ in groups] == ["linux/arm64", "linux/amd64"]
    assert groups[0][1] == [t[0], t[2]]


def test_scenarios_are_one_image_then_every_tag_for_every_platform() -> None:
    one, every = bench.scenarios(
        "127.0.0.1:5000", ["v0.7.1", "v0.7.1-cpu"], ["linux/amd64", "linux/arm64"]
    )
    assert one.targets == (bench.Target("127.0.0.1:5000/gpustack/gpustack:v0.7.1", "linux/amd64"),)
    assert len(every.targets) == 4
    assert [t.platform for t in every.targets] == ["linux/amd64"] * 2 + ["linux/arm64"] * 2
    assert "amd64+arm64" in every.name


def test_scenarios_need_a_tag_and_a_platform() -> None:
    with pytest.raises(bench.BenchError):
        bench.scenarios("127.0.0.1:5000", [], ["linux/amd64"])


def test_naive_tars_are_named_without_the_registry_port() -> None:
    a = bench.save_name(bench.Target("127.0.0.1:5000/gpustack/gpustack:v0.7.1", "linux/arm64"))
    b = bench.save_name(bench.Target("127.0.0.1:6000/gpustack/gpustack:v0.7.1", "linux/arm64"))
    assert a == b == "gpustack_gpustack-v0.7.1-linux_arm64.tar"


def test_table_has_the_columns_and_one_line_per_row() -> None:
    lines = bench.table([_row("one, cold"), _row("one, warm")]).splitlines()
    assert lines[0] == (
        "| scenario | naive bytes | ours bytes | ratio | naive s | ours s | ratio | floor bytes "
        "| ours ÷ floor |"
    )
    assert len(lines) == 4
    assert lines[2] == (
        "| one, cold | 0.0 MB | 0.0 MB | 3.00× | 12.0 | 4.0 | 3.00× | 0.0 MB | 1.034× |"
    )


def test_table_shows_sizes_in_megabytes_and_a_dash_for_no_ratio() -> None:
    row = bench.Row(
        "x", bench.Measurement(912_345_678, 1.0, 0.5, 1), bench.Measurement(0, 0.0, 0.0, 0), 0
    )
    line = bench.table([row]).splitlines()[2]
    assert "| 912.3 MB | 0.0 MB | — |" in line
    assert line.endswith("| — | 0.0 MB | — |")


def test_report_names_the_host_the_date_and_how_to_rerun() -> None:
    text = bench.report([_row()], FACTS, "the seeded images", "`nox -s bench`")
    assert "2025-01-02" in text
    assert "2 CPUs" in text
    assert "Docker Engine 20.10.24" in text
    assert "Rerun: `nox -s bench`" in text
    assert "Images: the seeded images" in text
    assert bench.table([_row()]) in text


def test_the_disk_table_shows_each_peak_as_a_multiple_of_its_bundle() -> None:
    row = bench.DiskRow("one image (v0.7.1, amd64)", 624_000_000, 312_000_000, 313_000_000,
                        312_500_000)  # fmt: skip
    assert (row.naive_ratio, round(row.ours_ratio or 0, 3)) == (2.0, 1.002)
    table = bench.disk_table([row])
    assert table.splitlines()[-1] == (
        "| one image (v0.7.1, amd64) | 624.0 MB | 312.0 MB | 2.000× "
        "| 313.0 MB | 312.5 MB | 1.002× |"
    )
    text = bench.report([_row()], FACTS, "the seeded images", "`nox -s bench`", disk_rows=[row])
    assert "## Peak extra disk beyond the cache" in text and table in text
    assert "Peak extra disk" not in bench.report([_row()], FACTS, "x", "y")


def test_allocated_counts_each_inode_once_and_no_link_into_the_cache(tmp_path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    out.mkdir()
    (cache / "blob").write_bytes(os.urandom(100_000))
    os.link(cache / "blob", out / "linked")
    (out / "own").write_bytes(os.urandom(50_000))
    os.link(out / "own", out / "own-again")
    counted = bench.allocated([out], cache)
    own = (out / "own").stat().st_blocks * 512
    assert counted == own + out.stat().st_blocks * 512  # the folder, and `own` once
    assert bench.allocated([out]) == counted + (cache / "blob").stat().st_blocks * 512


def test_report_is_written_atomically(tmp_path) -> None:
    dest = tmp_path / "docs" / "bench.md"
    dest.parent.mkdir()
    dest.write_text("old report\n")
    bench.write_report(dest, "new report\n")
    assert dest.read_text() == "new report\n"
    assert [p.name for p in dest.parent.iterdir()] == ["bench.md"]  # no temp file left


def test_split_table_separates_fetching_from_writing() -> None:
    lines = bench.split_table([_row()]).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| set, cold | 9.0 | 3.0 | 4 | 1.0 | 3.0 | 0 |"


def test_report_says_how_loaded_the_host_was() -> None:
    text = bench.report([_row()], FACTS, "x", "y")
    assert "load average 1.50 / 1.00 / 0.50" in text
    assert bench.split_table([_row()]) in text


PULL_COLD = """v0.7.1-cpu: Pulling from gpustack/gpustack
6d88108e2d91: Pulling fs layer
4d308a6e26fa: Pulling fs layer
6d88108e2d91: Download complete
4d308a6e26fa: Download complete
6d88108e2d91: Pull complete
4d308a6e26fa: Pull complete
Digest: sha256:2d5e7a5bcadb2ae7ab4df3d7e73210b264cf175061a1447fb2e2c97fdda06040
"""
PULL_SHARED = """v0.7.1: Pulling from gpustack/gpustack
6d88108e2d91: Already exists
5a0e8ac2a1b3: Pull complete
Digest: sha256:2d5e7a5bcadb2ae7ab4df3d7e73210b264cf175061a1447fb2e2c97fdda06040
"""
PULL_WARM = """v0.7.1-cpu: Pulling from gpustack/gpustack
Digest: sha256:2d5e7a5bcadb2ae7ab4df3d7e73210b264cf175061a1447fb2e2c97fdda06040
Status: Image is up to date for 127.0.0.1:5000/gpustack/gpustack:v0.7.1-cpu
"""


@pytest.mark.parametrize(("output", "layers"), [(PULL_COLD, 2), (PULL_SHARED, 1), (PULL_WARM, 0)])
def test_layers_docker_pulled_are_counted_from_its_output(output: str, layers: int) -> None:
    assert bench.pulled_layers(output) == layers


# --- GPUStack 2.x: one archive per image ----------------------------------------------------------


def _archive_row() -> bench.Row:
    return bench.Row(
        "2.x cell, cold",
        bench.Measurement(900_000_000, 30.0, None, 9),
        bench.Measurement(600_000_000, 10.0, 6.0, 7),
        floor=599_950_000,
    )


def test_save_images_command_is_upstreams_skopeo_copy_per_image() -> None:
    target = bench.Target("127.0.0.1:5000/gpustack/runner:cuda12.9-vllm0.32.0", "linux/amd64")
    dest = Path("/out") / bench.archive_path(target)
    assert dest == Path("/out/gpustack/runner/cuda12.9-vllm0.32.0.tar")
    assert bench.save_images_command(target, dest) == [
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times", "1",
        "--override-os", "linux", "--override-arch", "amd64",
        "docker://127.0.0.1:5000/gpustack/runner:cuda12.9-vllm0.32.0",
        "oci-archive:/out/gpustack/runner/cuda12.9-vllm0.32.0.tar:"
        "127.0.0.1:5000/gpustack/runner:cuda12.9-vllm0.32.0",
    ]  # fmt: skip


def test_a_step_that_fetches_and_writes_at_once_shows_dashes_in_the_split() -> None:
    line = bench.split_table([_archive_row()]).splitlines()[2]
    assert line == "| 2.x cell, cold | — | — | 9 | 6.0 | 4.0 | 7 |"


def test_report_puts_the_archive_rows_in_the_table_with_a_sentence() -> None:
    row = _archive_row()
    text = bench.report([_row()], FACTS, "x", "y", archive_rows=[row])
    assert bench.table([_row(), row]) in text
    assert bench.split_table([_row(), row]) in text
    sentence = bench.archives_sentence(row)
    assert sentence in text
    assert "900.0 MB, 1.50× our 600.0 MB tar" in sentence
    assert "1.000× the 600.0 MB floor (50 kB of tar headers" in sentence
    assert "gpustack save-images" in text


def test_an_archive_that_is_not_an_oci_layout_is_a_bench_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar")
    with pytest.raises(bench.BenchError, match="not an OCI archive of one image"):
        bench.archive_contents(junk)


BASE = 1 << 20  # the runners' shared base layer: 1 MiB, incompressible


@pytest.mark.integration
def test_archives_repeat_the_shared_base_and_ours_sits_on_the_floor(
    hub: Hub, tmp_path: Path
) -> None:
    refs = ["benchtest/runner:vllm", "benchtest/runner:sglang"]
    images = runner_images(refs, (AMD64,), base_size=BASE)
    push_images(hub, images)
    pushed = [image for ref in refs for image in images[ref]]
    sizes = [
        {blob.digest: blob.descriptor()["size"] for blob in (i.manifest, i.config, *i.layers)}
        for i in pushed
    ]
    per_image = sum(sum(blobs.values()) for blobs in sizes)  # what one archive each must carry
    floor = sum({d: n for blobs in sizes for d, n in blobs.items()}.values())  # each blob once
    scenario = bench.Scenario(
        "two runners", tuple(bench.Target(hub.ref(r), "linux/amd64") for r in refs)
    )

    row = bench.measure_archives(scenario, tmp_path / "work")

    assert row.floor == floor
    assert row.naive.fetched_layers == 4  # each archive fetched the base again
    assert row.ours.fetched_layers == 3  # ours once
    assert row.naive.bytes >= per_image > floor + BASE * 0.9  # the base is in both archives
    assert floor <= row.ours.bytes < floor + 32_000  # tar headers and index files only
    assert row.bytes_ratio is not None and row.bytes_ratio > 1.5
    assert not list((tmp_path / "work").rglob("*.tar"))  # every archive deleted once measured


@pytest.mark.integration
def test_an_archive_of_another_image_than_asked_is_refused(hub: Hub, tmp_path: Path) -> None:
    push_images(hub, runner_images(["benchtest/runner:other"], (AMD64,), base_size=1 << 10))
    target = bench.Target(hub.ref("benchtest/runner:other"), "linux/amd64")
    with pytest.raises(bench.BenchError, match="holds the wrong image"):
        bench.per_image_archives([target], tmp_path, {target: "sha256:" + "0" * 64})
