"""Build a pyannote speaker-diarization pipeline directory with UNTRAINED weights.

This exercises the path an operator takes with their own pipeline directory
(``MP4T_DIARIZATION_PIPELINE=/path/to/dir``): it writes a directory in exactly the layout of
``pyannote/speaker-diarization-community-1`` (``config.yaml`` + ``segmentation/pytorch_model.bin``
+ ``embedding/pytorch_model.bin`` + ``plda/{xvec_transform,plda}.npz``) from pyannote's own model
classes (PyanNet segmentation, WeSpeaker ResNet34 embedding) with random weights, so
``Pipeline.from_pretrained(dir)`` loads it through the real code. Its speaker labels are
meaningless: the quality tests use the pretrained built-in ``offline`` pipeline instead
(workers/stages/campplus.py). Used by tests/unit/test_offline_diarization.py and bench/bench.py.
Never point production at it.
"""
from __future__ import annotations

import pathlib
from typing import Any

CONFIG = """\
# UNTRAINED pipeline built by tests/support/untrained_pipeline.py (tests/benchmarks only).
dependencies:
  pyannote.audio: {version}
pipeline:
  name: pyannote.audio.pipelines.SpeakerDiarization
  params:
    segmentation: $model/segmentation
    embedding: $model/embedding
    plda: $model/plda
    clustering: VBxClustering
    segmentation_step: 0.1
    embedding_batch_size: 32
    embedding_exclude_overlap: true
    segmentation_batch_size: 32
params:
  segmentation:
    min_duration_off: 0.0
  clustering:
    threshold: 0.6
    Fa: 0.07
    Fb: 0.8
"""


def _save(model: Any, path: pathlib.Path) -> None:
    import lightning
    import torch

    ckpt: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(ckpt)  # pyannote's own metadata (architecture, specifications)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def build(directory: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    import numpy as np
    import torch
    from pyannote.audio import __version__
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding.wespeaker import WeSpeakerResNet34
    from pyannote.audio.models.segmentation import PyanNet

    torch.manual_seed(seed)
    out = pathlib.Path(directory)
    seg = PyanNet(sincnet={"stride": 10}, sample_rate=16000, num_channels=1)
    seg.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=10.0,
        min_duration=10.0, warm_up=(0.0, 0.0), classes=["speaker#1", "speaker#2", "speaker#3"],
        powerset_max_classes=2, permutation_invariant=True)
    seg.build()
    _save(seg, out / "segmentation" / "pytorch_model.bin")

    emb = WeSpeakerResNet34(sample_rate=16000, num_channels=1)
    emb.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK,
                                        duration=10.0, min_duration=1.0)
    _save(emb, out / "embedding" / "pytorch_model.bin")

    rng = np.random.default_rng(seed)
    dim, lda = emb.dimension, 128
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    (out / "plda").mkdir(parents=True, exist_ok=True)
    np.savez(out / "plda" / "xvec_transform.npz", mean1=np.zeros(dim), mean2=np.zeros(lda), lda=q[:, :lda])
    np.savez(out / "plda" / "plda.npz", mu=np.zeros(lda), tr=np.eye(lda), psi=np.linspace(2.0, 0.5, lda))
    (out / "config.yaml").write_text(CONFIG.format(version=__version__))
    return out
