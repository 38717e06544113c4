"""The built-in tri-modal data set: Fashion-MNIST images, their class names spoken by espeak-ng, generated questions.

Everything comes from real data available offline (`MultiModalData` chooses the set and its sizes;
`lightarch.training.multimodal` trains on it, `lightarch.evaluation.multimodal` measures on it):

- images: Fashion-MNIST (70,000 labelled 28x28 grey images, 10 classes), read from the IDX files of the Debian /
  Ubuntu package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/*.gz`). Training images come from the
  60,000-image train file, evaluation images from the 10,000-image test file: evaluation images are never trained on;
- audio: the ten class names spoken by `espeak-ng` (package `espeak-ng`) in several voices, speeds and pitches
  (22,050 Hz mono). Evaluation voices are not used in training. Clips are cached as WAV files on disk
  (`default_cache_dir()`), so a second run does not synthesize again;
- text: the class names and short descriptions (the text side of text-image and text-audio alignment);
- questions needing one or two modalities (`QUESTION_KINDS`), with short answers for generation:

      <image> what is shown?                                   -> "ankle boot"
      <audio> what is said?                                    -> "sneaker"
      <image> <audio> does the voice name what is shown?       -> "yes" / "no"
      <image> <image> which of the two items is worn on the feet?  -> "first" / "second"
      <image> where is it worn?                                -> "feet" / "legs" / "upper body" / ...

`source="synthetic"` builds the same structure from generated images (a fixed random pattern per class plus noise)
and generated tones (a frequency pair per class, shifted per "voice"): tests use it, they never need the apt packages.
A missing package raises `MissingDataError` naming the package and the install command.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import shutil
import struct
import subprocess
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizers import WORD_LEVEL_SPECIAL_TOKENS, word_level_tokenizer

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_COMMAND = "sudo apt-get install dataset-fashion-mnist espeak-ng"
ESPEAK_SAMPLING_RATE = 22_050

# Fashion-MNIST label order. The names are the answers of the "what is shown / said" questions and the spoken text.
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
WORN_ON = ("upper body", "legs", "upper body", "whole body", "upper body", "feet", "upper body", "feet", "carried",
           "feet")
FOOTWEAR = frozenset(i for i, place in enumerate(WORN_ON) if place == "feet")
DESCRIPTIONS = (
    "a short sleeved top",
    "long trousers for the legs",
    "a warm knitted top with long sleeves",
    "a one piece dress",
    "a warm coat with long sleeves",
    "an open summer shoe with straps",
    "a shirt with a collar and buttons",
    "a low sports shoe",
    "a bag with handles",
    "a short boot that covers the ankle",
)

# espeak-ng voices ("<language>[+<variant>]"): training voices, and held-out voices used only for evaluation.
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2")
HELDOUT_VOICES = ("en-us-nyc", "en-gb-x-gbcwmd+f4")
SPEEDS = (140, 170, 200)  # words per minute
PITCHES = (35, 50, 65)  # 0-99

# Synthetic fixture "voices": a frequency factor each (held-out ones lie between the trained ones).
SYNTHETIC_TRAIN_VOICES = ("synth-low", "synth-mid", "synth-high")
SYNTHETIC_HELDOUT_VOICES = ("synth-heldout",)
_SYNTHETIC_VOICE_FACTORS = {"synth-low": 0.9, "synth-mid": 1.0, "synth-high": 1.1, "synth-heldout": 0.95}

SPECIAL_TOKENS = WORD_LEVEL_SPECIAL_TOKENS  # <pad>=0, <unk>=1, <bos>=2, <eos>=3; the placeholders follow
IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"

# kind -> (question template, the modalities of its inputs in placeholder order)
QUESTION_KINDS = {
    "what_is_shown": ("<image> what is shown?", ("image",)),
    "what_is_said": ("<audio> what is said?", ("audio",)),
    "voice_names_shown": ("<image> <audio> does the voice name what is shown?", ("image", "audio")),
    "worn_on_feet": ("<image> <image> which of the two items is worn on the feet?", ("image", "image")),
    "where_worn": ("<image> where is it worn?", ("image",)),
}


class MissingDataError(RuntimeError):
    """A package that provides the built-in data is not installed (the message names it and the install command)."""


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ----------------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic `00 00 <dtype> <ndim>`, big-endian int32 sizes, then the data),
    gzip-compressed if its name ends in `.gz`."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()!r}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated (expected {ndim} sizes).")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} data bytes, the file has {len(data) - header}.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed if `path` ends in `.gz`); the inverse of `read_idx`."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, "
                         "float64.")
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def load_fashion_mnist(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of the "train" (60,000) or "test" (10,000) split."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}")
    check_fashion_mnist(root)
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = read_idx(Path(root) / image_file)
    labels = read_idx(Path(root) / label_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{root}: {image_file} has shape {images.shape} and {label_file} {labels.shape}; expected "
                         "(N, H, W) images and N labels.")
    return images, labels


def check_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR) -> Path:
    """The Fashion-MNIST folder, or `MissingDataError` naming the package to install."""
    root = Path(root)
    missing = [name for files in FASHION_MNIST_FILES.values() for name in files if not (root / name).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not found in {root}. The images come from the "
            f"Debian/Ubuntu package dataset-fashion-mnist; install the built-in data's packages with "
            f"`{INSTALL_COMMAND}` (or use --dataset synthetic for generated data)."
        )
    return root


# ----------------------------------------------------------------------------------------------------------------
# Speech (espeak-ng)
# ----------------------------------------------------------------------------------------------------------------


def check_espeak(executable: str = "espeak-ng") -> str:
    """The path of the espeak-ng executable, or `MissingDataError` naming the package to install."""
    found = shutil.which(executable)
    if found is None:
        raise MissingDataError(
            f"espeak-ng is not installed ({executable!r} is not on PATH). The spoken class names are synthesized with "
            f"the Debian/Ubuntu package espeak-ng; install the built-in data's packages with `{INSTALL_COMMAND}` (or "
            "use --dataset synthetic for generated data)."
        )
    return found


def check_requirements(root: str | os.PathLike = FASHION_MNIST_DIR, executable: str = "espeak-ng") -> None:
    """Both packages of the built-in data set, checked together so one error lists everything missing."""
    problems = []
    for check, arg in ((check_fashion_mnist, root), (check_espeak, executable)):
        try:
            check(arg)
        except MissingDataError as error:
            problems.append(str(error).split("; install the built-in")[0] + ".")
    if problems:
        raise MissingDataError(" ".join(problems) + f" Install them with `{INSTALL_COMMAND}` (or use --dataset "
                               "synthetic for generated data).")


def default_cache_dir() -> Path:
    """Where synthesized clips are cached: `$LIGHTARCH_CACHE/espeak-ng`, else `~/.cache/lightarch/espeak-ng`."""
    if os.environ.get("LIGHTARCH_CACHE"):
        return Path(os.environ["LIGHTARCH_CACHE"]) / "espeak-ng"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightarch" / "espeak-ng"


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sampling rate) of 16-bit PCM WAV bytes.

    espeak-ng writing to a pipe cannot seek back, so its header holds placeholder sizes (0x7ffff...): the data
    chunk is taken to run to the end of the bytes rather than trusting its size field.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    position, rate, channels, bits = 12, None, None, None
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], struct.unpack("<I", data[position + 4 : position + 8])[0]
        body = position + 8
        if chunk == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
        elif chunk == b"data":
            if rate is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            if bits != 16:
                raise ValueError(f"only 16-bit PCM WAV is supported, got {bits} bits")
            end = min(len(data), body + size)
            end -= (end - body) % (2 * channels)
            samples = np.frombuffer(data[body:end], dtype="<i2").reshape(-1, channels).mean(axis=1)
            return (samples / 32768.0).astype(np.float32), int(rate)
        position = body + size + (size % 2)
    raise ValueError("WAV file has no data chunk")


def trim_silence(waveform: np.ndarray, threshold: float = 0.01, margin: int = 441) -> np.ndarray:
    """`waveform` without leading / trailing samples quieter than `threshold`, keeping `margin` samples each side."""
    loud = np.nonzero(np.abs(waveform) > threshold)[0]
    if loud.size == 0:
        return waveform
    return waveform[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


@dataclass(frozen=True)
class Voice:
    """One espeak-ng speaker setting."""

    name: str  # espeak-ng voice, e.g. "en-us" or "en-us+f3"
    speed: int  # words per minute
    pitch: int  # 0-99

    def __str__(self) -> str:
        return f"{self.name} s{self.speed} p{self.pitch}"


def voice_grid(names: Sequence[str], speeds: Sequence[int] = SPEEDS, pitches: Sequence[int] = PITCHES) -> list[Voice]:
    return [Voice(name, speed, pitch) for name in names for speed in speeds for pitch in pitches]


def _espeak_version(executable: str) -> str:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
    return hashlib.sha256(out.encode("utf-8")).hexdigest()[:10]


def _clip_path(cache_dir: Path, text: str, voice: Voice) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{voice.name}_s{voice.speed}_p{voice.pitch}_{text}".lower()).strip("-")
    return cache_dir / f"{slug}.wav"


def _write_wav(path: Path, waveform: np.ndarray, sampling_rate: int) -> None:
    """16-bit mono WAV, written through a temporary sibling so a crash never leaves a truncated cache entry."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sampling_rate)
        w.writeframes((np.clip(waveform, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def speak(text: str, voice: Voice, cache_dir: str | os.PathLike | None = None, executable: str = "espeak-ng"
          ) -> np.ndarray:
    """`text` spoken by espeak-ng as a float32 waveform at 22,050 Hz (silence trimmed), from the cache if there."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _clip_path(cache_dir, text, voice)
    if path.is_file():
        return parse_wav(path.read_bytes())[0]
    check_espeak(executable)
    result = subprocess.run(
        [executable, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text],
        capture_output=True, check=False,
    )
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice}: {result.stderr.decode(errors='replace').strip()} "
                           f"(list the installed voices with `{executable} --voices=en`).")
    waveform, rate = parse_wav(result.stdout)
    if rate != ESPEAK_SAMPLING_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz audio; expected {ESPEAK_SAMPLING_RATE} Hz.")
    waveform = trim_silence(waveform)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_wav(path, waveform, rate)
    return parse_wav(path.read_bytes())[0]  # exactly what a cached run reads (16-bit rounding)


def speak_class_names(voices: Sequence[Voice], cache_dir: str | os.PathLike | None = None,
                      executable: str = "espeak-ng", show_progress: bool = True
                      ) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Every class name in every voice: (waveforms, labels, voice descriptions), voice-major order.

    Clips missing from the cache are synthesized two at a time; the cache folder is keyed by espeak-ng's version.
    """
    from tqdm.auto import tqdm

    check_espeak(executable)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = base / _espeak_version(executable)
    jobs = [(name, voice, label) for voice in voices for label, name in enumerate(CLASS_NAMES)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        waveforms = list(tqdm(pool.map(lambda job: speak(job[0], job[1], cache, executable), jobs), total=len(jobs),
                              desc="Speaking class names (espeak-ng, cached)", unit="clip",
                              disable=not show_progress))
    return waveforms, np.array([label for _, _, label in jobs], dtype=np.int64), [str(v) for _, v, _ in jobs]


# ----------------------------------------------------------------------------------------------------------------
# Pools of raw items per split
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModalityPool:
    """The raw items of one split; questions and alignment examples refer to them by index."""

    images: np.ndarray  # (N, 28, 28) uint8
    image_labels: np.ndarray  # (N,) int64 class ids
    clips: list[np.ndarray]  # float32 mono waveforms in [-1, 1]
    clip_labels: np.ndarray  # (M,) int64 class ids
    clip_voices: list[str]  # the voice of each clip
    sampling_rate: int

    def image_indices(self, label: int) -> np.ndarray:
        return np.nonzero(self.image_labels == label)[0]

    def clip_indices(self, label: int) -> np.ndarray:
        return np.nonzero(self.clip_labels == label)[0]

    def summary(self) -> dict:
        return {"images": int(len(self.images)), "clips": len(self.clips), "voices": sorted(set(self.clip_voices)),
                "sampling_rate": self.sampling_rate,
                "clip_seconds_mean": float(np.mean([len(c) for c in self.clips]) / self.sampling_rate)}


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` random items of every class (all of a class if it has fewer)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(CLASS_NAMES)):
        candidates = np.nonzero(labels == label)[0]
        chosen.append(rng.choice(candidates, size=min(per_class, len(candidates)), replace=False))
    return np.sort(np.concatenate(chosen))


def fashion_mnist_pools(train_images_per_class: int = 300, eval_images_per_class: int = 50,
                        train_voices: Sequence[Voice] | None = None, eval_voices: Sequence[Voice] | None = None,
                        root: str | os.PathLike = FASHION_MNIST_DIR, cache_dir: str | os.PathLike | None = None,
                        seed: int = 0, executable: str = "espeak-ng", show_progress: bool = True
                        ) -> dict[str, ModalityPool]:
    """{"train", "eval"} pools from the real data: training images from the Fashion-MNIST train file and training
    voices; evaluation images from the test file and held-out voices."""
    check_requirements(root, executable)
    train_voices = list(train_voices) if train_voices is not None else voice_grid(TRAIN_VOICES)
    eval_voices = list(eval_voices) if eval_voices is not None else voice_grid(HELDOUT_VOICES)
    overlap = {v.name for v in train_voices} & {v.name for v in eval_voices}
    if overlap:
        raise ValueError(f"evaluation voices must be held out of training; both use {sorted(overlap)}.")
    pools = {}
    for split, file_split, per_class, voices in (("train", "train", train_images_per_class, train_voices),
                                                 ("eval", "test", eval_images_per_class, eval_voices)):
        images, labels = load_fashion_mnist(file_split, root)
        keep = balanced_subset(labels, per_class, seed + (split == "eval"))
        clips, clip_labels, clip_voices = speak_class_names(voices, cache_dir, executable, show_progress)
        pools[split] = ModalityPool(images[keep], labels[keep], clips, clip_labels, clip_voices, ESPEAK_SAMPLING_RATE)
    return pools


def synthetic_pools(train_images_per_class: int = 8, eval_images_per_class: int = 4,
                    train_voices: Sequence[str] = SYNTHETIC_TRAIN_VOICES,
                    eval_voices: Sequence[str] = SYNTHETIC_HELDOUT_VOICES, sampling_rate: int = ESPEAK_SAMPLING_RATE,
                    clip_seconds: float = 0.25, seed: int = 0) -> dict[str, ModalityPool]:
    """{"train", "eval"} pools of generated data with the real set's structure (tests, smoke runs).

    Images: a fixed random 28x28 pattern per class plus per-image noise. Clips: two tones per class (frequencies
    set by the class, scaled by the voice's factor) with a fade in / out. Both are learnable in a few steps.
    """
    pattern_rng = np.random.default_rng(1234)
    patterns = pattern_rng.uniform(0, 255, size=(len(CLASS_NAMES), 28, 28))
    t = np.arange(int(clip_seconds * sampling_rate)) / sampling_rate
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)

    def pool(per_class: int, voices: Sequence[str], offset: int) -> ModalityPool:
        rng = np.random.default_rng(seed + offset)
        labels = np.repeat(np.arange(len(CLASS_NAMES)), per_class)
        noise = rng.normal(0, 40, size=(len(labels), 28, 28))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        clips, clip_labels, clip_voices = [], [], []
        for voice in voices:
            factor = _SYNTHETIC_VOICE_FACTORS.get(voice, 1.0)
            for label in range(len(CLASS_NAMES)):
                f1, f2 = (300 + 120 * label) * factor, (900 + 200 * label) * factor
                tone = 0.5 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * f2 * t)
                clips.append((envelope * tone + rng.normal(0, 0.01, size=t.shape)).astype(np.float32))
                clip_labels.append(label)
                clip_voices.append(voice)
        return ModalityPool(images, labels, clips, np.array(clip_labels, dtype=np.int64), clip_voices, sampling_rate)

    return {"train": pool(train_images_per_class, train_voices, 0), "eval": pool(eval_images_per_class, eval_voices, 1)}


DATASETS = ("fashion_mnist", "synthetic")


@dataclass(frozen=True)
class MultiModalData:
    """Which built-in data set and how much of it: `"fashion_mnist"` (real images, espeak-ng speech; needs the apt
    packages of `INSTALL_COMMAND`) or `"synthetic"` (generated images and tones: tests, smoke runs), images per class
    per split, held-out questions per kind, and where the real data and espeak-ng live."""

    dataset: str = "fashion_mnist"
    train_images_per_class: int = 300
    eval_images_per_class: int = 50
    eval_questions_per_kind: int = 100
    fashion_mnist_dir: str = str(FASHION_MNIST_DIR)
    espeak_executable: str = "espeak-ng"
    clip_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}.")
        for name in ("train_images_per_class", "eval_images_per_class", "eval_questions_per_kind"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")

    def pools(self, seed: int, show_progress: bool = True) -> dict[str, ModalityPool]:
        """{"train", "eval"} pools; raises `MissingDataError` naming the apt packages when the real data is absent."""
        if self.dataset == "synthetic":
            return synthetic_pools(self.train_images_per_class, self.eval_images_per_class, seed=seed)
        return fashion_mnist_pools(self.train_images_per_class, self.eval_images_per_class,
                                   root=self.fashion_mnist_dir, cache_dir=self.clip_cache_dir, seed=seed,
                                   executable=self.espeak_executable, show_progress=show_progress)


# ----------------------------------------------------------------------------------------------------------------
# Questions and alignment examples
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A generated question: `prompt` holds one placeholder per input, in the order of `inputs`."""

    kind: str
    prompt: str
    answer: str
    inputs: tuple[tuple[str, int], ...]  # (("image", index into pool.images), ("audio", index into pool.clips), ...)

    @property
    def image_indices(self) -> list[int]:
        return [i for modality, i in self.inputs if modality == "image"]

    @property
    def clip_indices(self) -> list[int]:
        return [i for modality, i in self.inputs if modality == "audio"]


def _question(pool: ModalityPool, kind: str, rng: random.Random) -> Question:
    template, _ = QUESTION_KINDS[kind]
    label = rng.randrange(len(CLASS_NAMES))
    image = int(rng.choice(pool.image_indices(label)))
    if kind == "what_is_shown":
        return Question(kind, template, CLASS_NAMES[label], (("image", image),))
    if kind == "where_worn":
        return Question(kind, template, WORN_ON[label], (("image", image),))
    if kind == "what_is_said":
        clip = int(rng.choice(pool.clip_indices(label)))
        return Question(kind, template, CLASS_NAMES[label], (("audio", clip),))
    if kind == "voice_names_shown":
        match = rng.random() < 0.5
        spoken = label if match else rng.choice([c for c in range(len(CLASS_NAMES)) if c != label])
        clip = int(rng.choice(pool.clip_indices(spoken)))
        return Question(kind, template, "yes" if match else "no", (("image", image), ("audio", clip)))
    if kind == "worn_on_feet":
        shoe = int(rng.choice(pool.image_indices(rng.choice(sorted(FOOTWEAR)))))
        other_label = rng.choice([c for c in range(len(CLASS_NAMES)) if c not in FOOTWEAR])
        other = int(rng.choice(pool.image_indices(other_label)))
        first = rng.random() < 0.5
        pair = (shoe, other) if first else (other, shoe)
        return Question(kind, template, "first" if first else "second", (("image", pair[0]), ("image", pair[1])))
    raise ValueError(f"unknown question kind {kind!r}; choose from {sorted(QUESTION_KINDS)}")


def generate_questions(pool: ModalityPool, per_kind: int, seed: int, kinds: Sequence[str] | None = None
                       ) -> list[Question]:
    """`per_kind` random questions of each kind (interleaved kind by kind), reproducible from `seed`."""
    kinds = list(kinds) if kinds is not None else list(QUESTION_KINDS)
    unknown = [k for k in kinds if k not in QUESTION_KINDS]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; choose from {sorted(QUESTION_KINDS)}")
    rng = random.Random(seed)
    return [_question(pool, kind, rng) for _ in range(per_kind) for kind in kinds]


def class_texts(label: int) -> list[str]:
    """The texts of a class for text-image / text-audio alignment: its name and descriptions of it."""
    name, description, place = CLASS_NAMES[label], DESCRIPTIONS[label], WORN_ON[label]
    worn = "carried in the hand" if place == "carried" else f"worn on the {place}"
    return [name, f"a picture of a {name}", f"{name}, {description}", f"{description}, {worn}"]


@dataclass(frozen=True)
class AlignmentExample:
    """One image, one clip and one text of the same class (the positives of the contrastive losses)."""

    label: int
    image: int  # index into pool.images
    clip: int  # index into pool.clips
    text: str


def alignment_examples(pool: ModalityPool, count: int, seed: int) -> list[AlignmentExample]:
    """`count` random same-class (image, clip, text) triplets, classes cycled so each appears equally often."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        label = i % len(CLASS_NAMES)
        examples.append(AlignmentExample(label, int(rng.choice(pool.image_indices(label))),
                                         int(rng.choice(pool.clip_indices(label))), rng.choice(class_texts(label))))
    rng.shuffle(examples)
    return examples


def vocabulary() -> list[str]:
    """Every word of the questions, answers and class texts (sorted), for a word-level tokenizer."""
    texts = [template for template, _ in QUESTION_KINDS.values()] + ["yes", "no", "first", "second"]
    texts += list(WORN_ON) + [t for label in range(len(CLASS_NAMES)) for t in class_texts(label)]
    words = set()
    for text in texts:
        words.update(split_words(text))
    return sorted(words - {IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER})


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`: `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, then
    `<image>`=4, `<audio>`=5 (special tokens, expanded by the processor), then the words. `<bos>` is prepended;
    `decode` joins words with spaces ("ankle boot")."""
    return word_level_tokenizer(vocabulary(), SPECIAL_TOKENS, extra_special_tokens=[IMAGE_PLACEHOLDER,
                                AUDIO_PLACEHOLDER], whitespace="split", pattern=_WORD_PATTERN, model_max_length=1 << 30)


_WORD_PATTERN = r"<image>|<audio>|\w+(?:-\w+)*|[^\w\s]"


def split_words(text: str) -> list[str]:
    """How the word-level tokenizer splits text: placeholders, words (with inner hyphens) and punctuation."""
    return re.findall(_WORD_PATTERN, text)


def question_inputs(processor, pool: ModalityPool, questions: Sequence[Question], with_answers: bool):
    """The processor's batch for `questions` (answers appended and labelled when `with_answers`)."""
    kwargs = {"answers": [q.answer for q in questions]} if with_answers else {}
    return processor(
        text=[q.prompt for q in questions],
        images=[[pool.images[i] for i in q.image_indices] for q in questions],
        audio=[[pool.clips[i] for i in q.clip_indices] for q in questions],
        sampling_rate=pool.sampling_rate, return_tensors="pt", **kwargs,
    )


def alignment_inputs(processor, pool: ModalityPool, examples: Sequence[AlignmentExample], prefix: str = ""):
    """The processor's alignment batch: each row a (text, image, clip) triplet of one class, labelled by class."""
    return processor.alignment_batch(
        text=[e.text for e in examples], images=[pool.images[e.image] for e in examples],
        audio=[pool.clips[e.clip] for e in examples], sampling_rate=pool.sampling_rate,
        labels=[e.label for e in examples], prefix=prefix,
    )


class QuestionAlignmentDataset:
    """Training items: question `i` together with alignment example `i` (one forward trains both losses)."""

    def __init__(self, questions: Sequence[Question], alignment: Sequence[AlignmentExample]) -> None:
        if len(questions) != len(alignment):
            raise ValueError(f"{len(questions)} questions but {len(alignment)} alignment examples; pass as many.")
        self.questions, self.alignment = list(questions), list(alignment)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        return {"question": self.questions[index], "alignment": self.alignment[index]}


class QuestionAlignmentCollator:
    """Batches `QuestionAlignmentDataset` items: the question batch (with answer labels) and, under `align_` keys,
    the alignment batch, as `MultiModalForConditionalGeneration.forward` takes them."""

    def __init__(self, processor, pool: ModalityPool) -> None:
        self.processor, self.pool = processor, pool

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = dict(question_inputs(self.processor, self.pool, [it["question"] for it in items], with_answers=True))
        batch.update(alignment_inputs(self.processor, self.pool, [it["alignment"] for it in items], prefix="align_"))
        return batch
