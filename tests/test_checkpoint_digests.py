"""Checkpoints prove they are intact: each is written with a sha256 sidecar, every use checks it, a
damaged one is skipped naming the mismatch, pruning keeps the newest intact one, and checkpoints
from before digests are used with one line saying they could not be verified."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tec_train.harness import checkpoints as ck
from tec_train.harness.errors import CheckpointError
from tests.faultkit import flip_byte


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 8), float(step))}, "global_step": step}


def _run(tmp_path: Path, steps: tuple[int, ...] = (2, 4, 6, 8)) -> Path:
    run = tmp_path / "run"
    for s in steps:
        ck.save_checkpoint(run, _state(s), s, keep_last=10)
    return run


def test_every_checkpoint_is_written_with_its_sha256(tmp_path: Path) -> None:
    run = _run(tmp_path)
    for _, path in ck.list_checkpoints(run):
        side = ck.digest_path(path)
        # sha256sum's format: `sha256sum -c checkpoint-*.pt.sha256` in the run dir checks them too.
        assert side.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
        assert ck.check_checkpoint(path).status == ck.INTACT
    assert ck.usable_checkpoint(run) == ck.checkpoint_path(run, 8)


@pytest.mark.parametrize("damaged", [(8,), (8, 6)], ids=["latest", "latest-two"])
def test_damaged_latest_checkpoints_are_skipped_naming_the_mismatch(tmp_path: Path, damaged: tuple[int, ...]) -> None:
    run = _run(tmp_path)
    for s in damaged:
        flip_byte(ck.checkpoint_path(run, s))
    said: list[str] = []
    found = ck.usable_checkpoint(run, say=said.append)
    assert found == ck.checkpoint_path(run, min(damaged) - 2)
    assert len(said) == len(damaged)
    for line, s in zip(said, sorted(damaged, reverse=True)):
        assert line.startswith(f"skipping checkpoint-{s:08d}.pt: sha256 mismatch: the file hashes to ")
        assert f"its digest checkpoint-{s:08d}.pt.sha256 says" in line


def test_a_torn_digest_is_a_damaged_checkpoint(tmp_path: Path) -> None:
    run = _run(tmp_path)
    side = ck.digest_path(ck.checkpoint_path(run, 8))
    side.write_text(side.read_text()[:30])
    said: list[str] = []
    assert ck.usable_checkpoint(run, say=said.append) == ck.checkpoint_path(run, 6)
    assert said == [f"skipping checkpoint-00000008.pt: its digest checkpoint-00000008.pt.sha256 is torn or malformed "
                    f"(expected '<64 hex digits>  checkpoint-00000008.pt', got {side.read_text()!r})"]


def test_none_intact_is_an_error_listing_what_was_checked(tmp_path: Path) -> None:
    run = _run(tmp_path, (2, 4))
    flip_byte(ck.checkpoint_path(run, 2))
    flip_byte(ck.checkpoint_path(run, 4))
    with pytest.raises(CheckpointError, match=r"no intact tec-train checkpoint; checked checkpoint-00000004\.pt: sha256 "
                                              r"mismatch.*; checkpoint-00000002\.pt: sha256 mismatch"):
        ck.usable_checkpoint(run)
    with pytest.raises(CheckpointError, match=r"checkpoint-00000004\.pt: sha256 mismatch"):
        ck.verify_checkpoint_file(ck.checkpoint_path(run, 4))


def test_checkpoints_from_before_digests_are_used_and_said_unverified(tmp_path: Path) -> None:
    run = _run(tmp_path)
    for _, path in ck.list_checkpoints(run):
        ck.digest_path(path).unlink()
    said: list[str] = []
    assert ck.usable_checkpoint(run, say=said.append) == ck.checkpoint_path(run, 8)
    assert said == ["using checkpoint-00000008.pt: has no checkpoint-00000008.pt.sha256 (written before checkpoints "
                    "carried a digest): it could not be verified"]


def test_pruning_never_deletes_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    """Resumed from step 4 past damaged 6 and 8, a run with --keep-last 1 writes 5: 5 stays (with its
    digest) although 6 and 8 have higher numbers; 6 is rewritten intact when the run gets there."""
    run = _run(tmp_path)
    flip_byte(ck.checkpoint_path(run, 6))
    flip_byte(ck.checkpoint_path(run, 8))
    ck.save_checkpoint(run, _state(5), 5, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(run)] == [5, 8]
    assert ck.usable_checkpoint(run) == ck.checkpoint_path(run, 5)
    assert not ck.digest_path(ck.checkpoint_path(run, 4)).exists()  # pruned with its checkpoint
    ck.save_checkpoint(run, _state(8), 8, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(run)] == [8] and ck.check_checkpoint(ck.checkpoint_path(run, 8)).status == ck.INTACT


def test_a_digest_whose_checkpoint_never_got_its_name_is_cleaned(tmp_path: Path) -> None:
    """Killed between the digest's rename and the checkpoint's: the next writer removes the orphan."""
    run = _run(tmp_path, (2,))
    orphan = ck.digest_path(ck.checkpoint_path(run, 4))
    orphan.write_text(ck.digest_path(ck.checkpoint_path(run, 2)).read_text())
    temp = run / ".checkpoint-00000004.pt.tmp-99"
    temp.write_bytes(b"PK")
    assert set(ck.remove_stale_temp_files(run)) == {orphan, temp}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.sha256"]


def test_encoder_readers_check_the_digest(tmp_path: Path) -> None:
    """export / finetune / knn / linear from a run dir use its newest intact checkpoint; a damaged
    checkpoint file named directly is refused."""
    from tec_train.encoder_weights import read_encoder_weights

    run = _run(tmp_path, (2,))
    flip_byte(ck.checkpoint_path(run, 2))
    with pytest.raises(ValueError, match=r"checkpoint-00000002\.pt: sha256 mismatch"):
        read_encoder_weights(ck.checkpoint_path(run, 2))
    with pytest.raises(ValueError, match=r"no intact tec-train checkpoint; checked checkpoint-00000002\.pt: sha256 mismatch"):
        read_encoder_weights(run)
