"""Per-bucket graphs (graphs.py) and the tiny decoder (decoder.py) on the tiny model, on a CPU.

The compile mode here uses torch.compile's "eager" backend: dynamo traces, guards, caches and
recompiles exactly as it does in front of inductor (static shapes, one graph per bucket,
``dynamic=False``, counted by the runner's backend wrapper), but the captured graph runs as
PyTorch ops instead of going through inductor's C++ code generation, which takes minutes per
bucket on 2 shared cores. Not "aot_eager": on torch 2.13 CPU its bucket-1 graph fails in
native_group_norm ("Expected X.is_contiguous"). CUDA graphs and inductor need a GPU: they are
checked by ``bench/bench_gpu_path.py``.

Latents are 8x8 (64x64 images) instead of the engine's 32x32: the same networks (both are
fully convolutional), 16 times cheaper.

Tolerances: the same rows at the same batch size must match to 1e-5 (fp32); across batch sizes
CPU convolutions block the batch differently, which moves results by ~2e-5, so rows compared
across batches get 1e-4 (a leaked or misplaced row differs by ~0.1-1).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from websocket_service.engines.musetalk.audio import positional_encoding  # noqa: E402
from websocket_service.engines.musetalk.decoder import (  # noqa: E402
    decoder_scale,
    load_taesd,
    make_decode,
    make_generate,
    make_unet,
)
from websocket_service.engines.musetalk.graphs import (  # noqa: E402
    BUCKETS,
    BucketRunner,
    bucket_for,
    chunk_sizes,
    resolve_mode,
)
from websocket_service.engines.musetalk.loader import load_bundle  # noqa: E402
from websocket_service.errors import ModelNotFound  # noqa: E402

from .musetalk_tiny import write_tiny_model  # noqa: E402

LATENT = (8, 8, 8)
AUDIO = (50, 384)
CPU = torch.device("cpu")
ACROSS = 1e-4  # tolerance across batch sizes (see the docstring)
TAESD_CONFIG = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def nets(model):
    bundle = load_bundle(model, "v15", "cpu", False)
    return bundle.unet, bundle.vae, positional_encoding(*AUDIO)


def reference_float(unet, decoder, pe, scale):
    """MuseTalk's per-frame arithmetic up to the decoded image in [-1, 1], written out here
    (not taken from decoder.py) so that make_generate is checked against it."""

    def fn(latents, audio):
        t = torch.zeros((), dtype=torch.long)
        pred = unet(latents, t, encoder_hidden_states=audio + pe).sample
        return decoder.decode(pred / scale).sample

    return fn


def quantise(images: torch.Tensor) -> np.ndarray:
    return (images / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *LATENT), generator=g), torch.randn((n, *AUDIO), generator=g)


def eager(fn, latents, audio) -> np.ndarray:
    with torch.inference_mode():
        return fn(latents, audio).numpy()


@pytest.fixture(scope="module")
def float_fn(nets):
    unet, vae, pe = nets
    return reference_float(unet, vae, pe, decoder_scale(vae))


@pytest.fixture(scope="module")
def compiled(float_fn):
    runner = BucketRunner(float_fn, (LATENT, AUDIO), CPU, torch.float32, mode="compile",
                          compile_backend="eager")
    runner.warm_up()
    return runner


# -- buckets
def test_bucket_for_edges():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 32, 32, 32]
    for bad in (0, -1, 33):
        with pytest.raises(ValueError):
            bucket_for(bad)
    assert bucket_for(4, (5, 3)) == 5 and bucket_for(3, (5, 3)) == 3  # any order


def test_chunk_sizes():
    assert chunk_sizes(32, 8) == [8, 8, 8, 8]
    assert chunk_sizes(20, 8) == [8, 8, 4]
    assert chunk_sizes(5, 2) == [2, 2, 1]
    assert chunk_sizes(6, 8) == chunk_sizes(6, 0) == chunk_sizes(6, 6) == [6]
    assert chunk_sizes(0, 8) == []
    for n, c in ((-1, 8), (4, -1)):
        with pytest.raises(ValueError):
            chunk_sizes(n, c)


def test_modes_resolve():
    assert resolve_mode("auto", CPU) == "eager"
    assert resolve_mode("auto", torch.device("cuda")) == "cuda-graph"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_mode("cuda-graph", CPU)
    with pytest.raises(ValueError, match="unknown"):
        resolve_mode("tensorrt", CPU)
    with pytest.raises(ValueError, match="compile_kernels"):
        BucketRunner(lambda a, b: a, (LATENT, AUDIO), CPU, torch.float32, mode="eager",
                     compile_kernels=True)


# -- compile mode against eager
def test_compiled_equals_eager_per_bucket(compiled, float_fn):
    assert compiled.mode == "compile" and compiled.max_batch == 32
    for k, b in enumerate(BUCKETS):
        lat, aud = inputs(b, seed=k)
        got = compiled.run(lat, aud)
        assert got.shape == (b, 3, 64, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, eager(float_fn, lat, aud), rtol=0, atol=1e-5)


def test_one_static_compile_per_bucket(compiled):
    assert compiled.compile_counts == {b: 1 for b in BUCKETS}
    assert set(compiled.capture_s) == set(BUCKETS)
    for n in range(1, compiled.max_batch + 1):
        lat, aud = inputs(n, seed=100 + n)
        assert compiled.run(lat, aud).shape[0] == n
    assert compiled.compile_counts == {b: 1 for b in BUCKETS}  # no recompiles
    assert compiled.dynamic_counts == {b: 0 for b in BUCKETS}  # never a dynamic-shape graph


# -- padding
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_padding_does_not_change_real_rows(mode, compiled, float_fn):
    runner = compiled if mode == "compile" else BucketRunner(float_fn, (LATENT, AUDIO), CPU,
                                                             torch.float32, mode="eager")
    lat, aud = inputs(7, seed=7)
    alone = eager(float_fn, lat[:3], aud[:3])  # 3 rows, no padding
    padded = runner.run(lat[:3], aud[:3])  # 3 rows padded to 4
    np.testing.assert_allclose(padded, alone, rtol=0, atol=ACROSS)
    in_other = runner.run(lat, aud)[:3]  # the same rows as part of 7, padded to 8
    np.testing.assert_allclose(in_other, alone, rtol=0, atol=ACROSS)
    # a previous batch's rows never leak into the padding
    big_lat, big_aud = inputs(4, seed=9)
    runner.run(big_lat * 50, big_aud * 50)
    np.testing.assert_array_equal(runner.run(lat[:3], aud[:3]), padded)


def test_results_are_new_arrays(float_fn):
    runner = BucketRunner(float_fn, (LATENT, AUDIO), CPU, torch.float32, mode="auto")
    assert runner.mode == "eager" and runner.warm_up() == {b: 0.0 for b in BUCKETS}
    a = runner.run(*inputs(2, seed=1))
    before = a.copy()
    runner.run(*inputs(2, seed=2))
    np.testing.assert_array_equal(a, before)


def test_bad_inputs_and_wrong_thread(compiled, float_fn):
    lat, aud = inputs(33, seed=3)
    with pytest.raises(ValueError, match="largest bucket"):
        compiled.run(lat, aud)
    with pytest.raises(ValueError):
        compiled.run(lat[:0], aud[:0])
    with pytest.raises(ValueError, match="different row counts"):
        compiled.run(lat[:2], aud[:3])
    with pytest.raises(ValueError, match=r"expected inputs \[n, 8, 8, 8\], \[n, 50, 384\]"):
        compiled.run(lat[:2, :4], aud[:2])
    with pytest.raises(ValueError, match="expected inputs"):
        compiled.run(lat[:2])  # one input of two
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match="thread"):
            pool.submit(compiled.run, lat[:1], aud[:1]).result(timeout=60)
    cold = BucketRunner(float_fn, (LATENT, AUDIO), CPU, torch.float32, mode="compile",
                        compile_backend="eager")
    with pytest.raises(RuntimeError, match="warm_up"):
        cold.run(lat[:1], aud[:1])


# -- the engine's two runners: the UNet's latents on the device, then the decoder in chunks
def two_runners(nets, mode: str, chunk: int, buckets: tuple[int, ...] = BUCKETS):
    unet, vae, pe = nets
    pred = (4, *LATENT[1:])
    kw = {"compile_backend": "eager"} if mode == "compile" else {}
    first = BucketRunner(make_unet(unet, pe, decoder_scale(vae)), (LATENT, AUDIO), CPU,
                         torch.float32, mode=mode, buckets=buckets, to_host=False, **kw)
    second = BucketRunner(make_decode(vae), (pred,), CPU, torch.float32, mode=mode,
                          buckets=tuple(b for b in BUCKETS if b <= chunk), **kw)
    first.warm_up()
    second.warm_up()
    return first, second


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_unet_then_decoder_in_chunks_equals_the_whole_network(nets, float_fn, mode):
    """What the core runs per batch: the UNet over 5 frames (bucket 8), then the decoder over
    chunks of 2, 2 and 1 (buckets 2, 2, 1): the faces of the whole network in one call, chunk by
    chunk, whatever the padding."""
    unet_runner, decode_runner = two_runners(nets, mode, chunk=2, buckets=(8,))
    assert decode_runner.buckets == (1, 2)
    lat, aud = inputs(5, seed=11)
    pred = unet_runner.run(lat, aud)
    assert isinstance(pred, torch.Tensor) and pred.shape == (5, 4, 8, 8)
    faces, at = [], 0
    for c in chunk_sizes(5, 2):
        faces.append(decode_runner.run(pred[at:at + c]))
        at += c
    assert [f.shape for f in faces] == [(2, 64, 64, 3), (2, 64, 64, 3), (1, 64, 64, 3)]
    with torch.inference_mode():
        whole = quantise(float_fn(lat, aud))
    got = np.concatenate(faces)
    assert got.dtype == np.uint8
    # rows computed at other batch sizes: a level where a value sits on a rounding edge
    diff = np.abs(got.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # a frame's face does not depend on the chunk it was decoded in
    np.testing.assert_array_equal(decode_runner.run(pred[4:5]), faces[2])


def test_device_outputs_survive_the_next_run():
    """``to_host=False`` hands back a copy. A captured graph's output is a static buffer that
    the next replay overwrites (as is the padded input an identity function returns here):
    the latents the decoder is still reading must not change under it."""
    runner = BucketRunner(lambda x: x, ((3,),), CPU, torch.float32, mode="eager",
                          buckets=(4,), to_host=False)
    first = runner.run(torch.ones((2, 3)))
    second = runner.run(torch.full((3, 3), 7.0))
    assert torch.equal(first, torch.ones((2, 3))) and torch.equal(second, torch.full((3, 3), 7.0))
    on_host = BucketRunner(lambda x: x, ((3,),), CPU, torch.float32, mode="eager", buckets=(4,))
    kept = on_host.run(torch.ones((2, 3)))
    on_host.run(torch.zeros((2, 3)))
    assert isinstance(kept, np.ndarray) and (kept == 1).all()


# -- make_generate and the tiny decoder
def test_generate_is_musetalk_arithmetic_in_uint8(nets, float_fn):
    unet, vae, pe = nets
    generate = make_generate(unet, vae, pe, decoder_scale(vae))
    runner = BucketRunner(generate, (LATENT, AUDIO), CPU, torch.float32, mode="eager")
    lat, aud = inputs(4, seed=5)  # a full bucket: the reference runs the same batch size
    got = runner.run(lat, aud)
    assert got.shape == (4, 64, 64, 3) and got.dtype == np.uint8
    with torch.inference_mode():
        np.testing.assert_array_equal(got, quantise(float_fn(lat, aud)))
    assert runner.run(lat[:3], aud[:3]).shape == (3, 64, 64, 3)


def write_taesd(model_path: Path) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(**TAESD_CONFIG).save_pretrained(model_path / "taesd")
    return model_path / "taesd"


def test_taesd_loads_and_generates(nets, tmp_path):
    from diffusers import AutoencoderTiny

    unet, vae, pe = nets
    write_taesd(tmp_path)
    taesd = load_taesd(tmp_path, CPU, torch.float32)
    assert isinstance(taesd, AutoencoderTiny) and not taesd.training
    assert decoder_scale(taesd) == 1.0
    generate = make_generate(unet, taesd, pe, decoder_scale(taesd))
    runner = BucketRunner(generate, (LATENT, AUDIO), CPU, torch.float32, mode="eager")
    lat, aud = inputs(4, seed=6)
    got = runner.run(lat, aud)
    assert got.shape == (4, 64, 64, 3) and got.dtype == np.uint8
    assert runner.run(lat[:3], aud[:3]).shape == (3, 64, 64, 3)
    with torch.inference_mode():  # decoded by TAESD, not by the SD-VAE
        np.testing.assert_array_equal(got, quantise(reference_float(unet, taesd, pe, 1.0)(lat, aud)))
        assert not np.array_equal(got, quantise(reference_float(unet, vae, pe, 1.0)(lat, aud)))


def test_taesd_missing_is_fatal_and_named(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        load_taesd(tmp_path, CPU, torch.float32)
    assert str(tmp_path / "taesd") in err.value.message and err.value.fatal
    assert err.value.details["file"] == str(tmp_path / "taesd")
    folder = write_taesd(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="taesd/diffusion_pytorch_model") as err:
        load_taesd(tmp_path, CPU, torch.float32)
    assert err.value.fatal
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFound, match="taesd/config.json"):
        load_taesd(tmp_path, CPU, torch.float32)
