"""checkpoint.ScratchFiles: tensors parked in files beside an output, mapped back, gone afterwards."""

import gc
from pathlib import Path

import pytest
import torch

from ds_upcycle.checkpoint import ScratchFiles


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parked_tensors_equal_their_source_and_the_folder_goes(tmp_path, dtype):
    out = tmp_path / "ckpt"
    source = torch.randn(37, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    with ScratchFiles(out) as scratch:
        parked = scratch.park(source.t())  # a view: parked as its values, in its shape
        empty = scratch.park(torch.zeros(0, 4, dtype=dtype))
        assert torch.equal(parked, source.t()) and parked.dtype == dtype and empty.shape == (0, 4)
        assert [p.name.endswith(".scratch") for p in tmp_path.iterdir()] == [True]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError), ScratchFiles(out) as scratch:
        scratch.park(source)
        raise ValueError("a failed write")
    assert list(tmp_path.iterdir()) == []


def test_a_parked_tensor_read_through_holds_no_anonymous_memory(tmp_path):
    with ScratchFiles(tmp_path / "ckpt") as scratch:
        big = torch.ones(64, 1024, 1024)  # 256 MB
        parked = scratch.park(big)
        del big
        gc.collect()
        before = rss_anon_mb()
        assert parked.sum().item() == 64 * 1024 * 1024  # every page read
        assert rss_anon_mb() - before < 32
