"""The CPU decode-attention kernel against its plain-torch twin (backends/torch.py's gather + SDPA path), on
MHA, GQA and MLA layouts, ragged lengths, shuffled blocks and MindIE's block size; and the fallback."""

import pytest
import torch

from dsserve.backends.cpu import kernels as cpu_kernels
from types import SimpleNamespace

from dsserve.backends import torch as A
from dsserve.backends.cpu.backend import CpuBackend, _kernel_reads

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the kernel cannot be built")


def _meta(lens: list[int], block_size: int, num_blocks: int, seed: int) -> A.AttentionMetadata:
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size)
    ids = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    key_pos = torch.arange(max_blocks * block_size)
    lens_t = torch.tensor(lens)
    mask = (key_pos.view(1, 1, 1, -1) < lens_t.view(-1, 1, 1, 1))
    return A.AttentionMetadata(slot_mapping=None, query_index=None, query_valid=None, block_tables=ids,
                               attn_mask=mask, is_decode=True, context_lens=lens_t)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (8, 2, 64), (12, 2, 128), (7, 1, 16), (20, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 128, 5])
@pytest.mark.parametrize("lens", [[1], [37, 1, 16, 100, 255], [300] * 3])
def test_gqa_matches_torch(heads, kv_heads, head_dim, block_size, lens):
    torch.manual_seed(0)
    meta = _meta(lens, block_size, num_blocks=4 + len(lens) * -(-max(lens) // block_size), seed=1)
    cache = torch.randn(meta.block_tables.max() + 3, block_size, 2, kv_heads, head_dim)
    q = torch.randn(len(lens), heads, head_dim)
    scale = head_dim**-0.5
    got = cpu_kernels.paged_decode(q, cache, meta.block_tables, meta.context_lens, scale, num_kv_heads=kv_heads,
                                   v_dim=head_dim, token_stride=2 * kv_heads * head_dim, head_stride=head_dim,
                                   v_offset=kv_heads * head_dim)
    context = meta.gather(cache)
    keys, values = context[:, :, 0].transpose(1, 2), context[:, :, 1].transpose(1, 2)
    want = meta.unpad(A._grouped_attention(meta.pad_queries(q), keys, values, meta, scale))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [[1], [5, 200, 33], [64] * 9])
@pytest.mark.parametrize("heads", [1, 8, 11, 16])
def test_mla_latent_matches_torch(lens, heads):
    torch.manual_seed(0)
    latent, rope, block_size = 512, 64, 16
    meta = _meta(lens, block_size, num_blocks=64, seed=2)
    cache = torch.randn(64, block_size, latent + rope)
    queries = torch.randn(len(lens), heads, latent + rope)
    got = cpu_kernels.paged_decode(queries, cache, meta.block_tables, meta.context_lens, 0.07, num_kv_heads=1,
                                   v_dim=latent, token_stride=latent + rope, head_stride=0, v_offset=0)
    keys = meta.gather(cache).unsqueeze(1)
    want = meta.unpad(A._grouped_attention(meta.pad_queries(queries), keys, keys[..., :latent], meta, 0.07))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_extreme_scores_stay_finite():
    """A score far above the rest (a 'sink' token) and a long context: the online softmax rescales, no overflow."""
    meta = _meta([1000, 3], 16, num_blocks=130, seed=3)
    cache = torch.randn(130, 16, 2, 1, 32)
    first = meta.block_tables[0, 40]  # a key in the middle of sequence 0 that every query loves
    cache[first, 7, 0] = 40.0
    q = torch.full((2, 2, 32), 1.0)
    got = cpu_kernels.paged_decode(q, cache, meta.block_tables, meta.context_lens, 1.0, num_kv_heads=1, v_dim=32,
                                   token_stride=64, head_stride=32, v_offset=32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], cache[first, 7, 1, 0], rtol=1e-5, atol=1e-5)


def test_disabled_by_environment_takes_the_torch_path(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CPU_KERNELS", "0")
    assert cpu_kernels.library() is None
    assert "DSSERVE_CPU_KERNELS=0" in caplog.text
    meta = _meta([20, 3], 16, num_blocks=8, seed=4)
    assert not _kernel_reads(torch.randn(2, 4, 8), torch.randn(8, 16, 2, 2, 8), 8, 8)


def test_no_compiler_is_reported(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert cpu_kernels.library() is None
    assert "no C compiler" in caplog.text and not any(tmp_path.rglob("*.so"))


def test_built_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    assert cpu_kernels.library() is not None
    built = list((tmp_path / "kernels").glob("dsserve_cpu-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))


def test_head_size_off_the_vector_width_takes_the_torch_path():
    width = cpu_kernels._state["width"]
    if width == 1:
        pytest.skip("the generic build takes any head size")
    meta = _meta([20, 3], 16, num_blocks=8, seed=5)
    assert _kernel_reads(torch.randn(2, 4, 8 * width), torch.randn(8, 16, 2, 2, 8 * width), 8 * width,
                             8 * width)
    assert not _kernel_reads(torch.randn(2, 4, 12), torch.randn(8, 16, 2, 2, 12), 12, 12)


@pytest.mark.parametrize("lens", [[1], [37, 1, 16, 100, 255]])
def test_float16_cache_matches_torch_on_the_widened_cache(lens):
    if not cpu_kernels.usable(64, 64, torch.float16):
        pytest.skip("this build reads no float16 cache (needs AVX2 + F16C)")
    torch.manual_seed(0)
    meta = _meta(lens, 16, num_blocks=4 + len(lens) * 16, seed=6)
    cache = torch.randn(meta.block_tables.max() + 3, 16, 2, 2, 64).half()
    q = torch.randn(len(lens), 8, 64)
    got = cpu_kernels.paged_decode(q, cache, meta.block_tables, meta.context_lens, 0.125, num_kv_heads=2, v_dim=64,
                                   token_stride=256, head_stride=64, v_offset=128)
    context = meta.gather(cache).float()
    keys, values = context[:, :, 0].transpose(1, 2), context[:, :, 1].transpose(1, 2)
    want = meta.unpad(A._grouped_attention(meta.pad_queries(q), keys, values, meta, 0.125))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    latent = torch.randn(cache.shape[0], 16, 576).half()  # MLA's latent entry
    queries = torch.randn(len(lens), 8, 576)
    got = cpu_kernels.paged_decode(queries, latent, meta.block_tables, meta.context_lens, 0.07, num_kv_heads=1,
                                   v_dim=512, token_stride=576, head_stride=0, v_offset=0)
    keys = meta.gather(latent).float().unsqueeze(1)
    want = meta.unpad(A._grouped_attention(meta.pad_queries(queries), keys, keys[..., :512], meta, 0.07))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_failed_build_is_reported_and_leaves_nothing(monkeypatch, tmp_path, caplog):
    import shutil

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: shutil.which("false"))
    assert cpu_kernels.library() is None
    assert "false failed on paged_attention.c" in caplog.text
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (12, 1), (6, 2)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_prompt_step_through_the_kernel_matches_the_masked_torch_path(cache_dtype, heads, kv_heads, block_size,
                                                                       monkeypatch):
    """A step with prompt tokens: fresh prompts, a chunk continuing an earlier one, a decode row, shuffled blocks.
    Each token through the kernel over its own prefix (token_lens, token_tables()) equals the padded, masked SDPA
    over the gathered context, and every token's K/V lands in the cache the same way."""
    from dsserve.runner.batch import StepInputs, build_forward_batch

    torch.manual_seed(0)
    if cache_dtype == torch.float16 and not cpu_kernels.usable(64, 64, torch.float16):
        pytest.skip("this build reads no float16 cache (needs AVX2 + F16C)")
    head_dim, num_blocks = 64, 120
    starts, query_lens = [0, 20, 37, 0], [9, 30, 1, 50]
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for start, n in zip(starts, query_lens):
        need = -(-(start + n) // block_size)
        tables.append(order[used : used + need])
        used += need
    chunks = [list(range(n)) for n in query_lens]
    inputs = StepInputs.build(chunks, starts, tables)
    backend = CpuBackend()
    batch = build_forward_batch(inputs, block_size, torch.device("cpu"), backend)
    meta = batch.attn
    assert meta.token_lens is not None and meta.token_lens.tolist() == (batch.positions + 1).tolist()
    calls = []
    real = cpu_kernels.paged_decode
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim)
    k, v = torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, head_dim)
    base = torch.randn(num_blocks, block_size, 2, kv_heads, head_dim).to(cache_dtype)  # earlier chunks' K/V
    scale = head_dim**-0.5
    cache_kernel, cache_torch = base.clone(), base.clone()
    layer = SimpleNamespace(scale=scale)
    got = backend.attention(layer, q, k, v, cache_kernel, meta)
    assert calls == [(total, heads, head_dim)]  # the whole step in one kernel call
    meta.token_lens = None  # the gather + masked SDPA path (its decode row takes the kernel as a decode part)
    want = backend.attention(layer, q, k, v, cache_torch, meta)
    torch.testing.assert_close(cache_kernel, cache_torch, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_chunks_continuing_a_longer_context_keep_the_sdpa_path():
    """The per-token kernel path is taken while every prompt chunk's earlier context is at most its own length
    (decode rows are fine either way); a chunk continuing a longer context goes to the gather + SDPA path."""
    from dsserve.runner.batch import StepInputs, build_forward_batch

    def meta(starts, query_lens):
        tables = [list(range(i * 20, i * 20 + -(-(s + n) // 16))) for i, (s, n) in enumerate(zip(starts, query_lens))]
        chunks = [list(range(n)) for n in query_lens]
        return build_forward_batch(StepInputs.build(chunks, starts, tables), 16, torch.device("cpu"),
                                   CpuBackend()).attn

    assert meta([0, 30, 200], [40, 30, 1]).token_lens is not None
    assert meta([0, 31], [40, 30]).token_lens is None
    assert meta([100], [10]).token_lens is None
