"""Audio input: decoding, resampling to 16 kHz, dtype/channel handling and validation.

Everything a user can pass to ``encode`` becomes a list of 1-D float32 numpy arrays at 16 kHz, or a
ValueError / TypeError that names the problem.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from audioenc.config import SAMPLE_RATE
from audioenc.frontend import pcm_to_float32
from audioenc.ogg_pages import links as ogg_links

MIN_RATE, MAX_RATE = 4000, 384000
SUPPORTED_DTYPES = (np.float16, np.float32, np.float64, np.int16, np.int32)
MAX_CHANNELS = 8  # a 2-D array this narrow and longer than wide is (samples, channels), not a batch
# What a directory search picks up: soundfile's formats (.sph: NIST SPHERE, as in TIMIT), then PyAV's.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd",
                    ".opus", ".w64", ".rf64", ".caf", ".sph", ".nist", ".voc",
                    ".m4a", ".aac", ".mp4", ".webm", ".mka", ".wma")


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decodes a file with soundfile, or with PyAV (FFmpeg) for formats soundfile cannot read when
    PyAV is installed; multi-channel audio is averaged to mono. Returns (float32, rate)."""
    import soundfile as sf

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected an audio file")
    if not os.path.exists(path):
        broken = os.path.lexists(path)  # a link to nothing, or a loop of links
        raise ValueError(f"{path}: {'a link that leads to no file' if broken else 'no such file'}")
    if not os.path.isfile(path):  # opening a named pipe would wait for a writer
        raise ValueError(f"{path}: not a regular file (a pipe, socket or device)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: an empty file (0 bytes)")
    problem = truncation(path)  # the header alone tells: before decoding
    if problem:
        raise ValueError(f"{path}: {problem}")
    links = ogg_links(path)  # every Ogg page checked: decoders skip a damaged one without a word
    if links is not None and len(links) > 1:
        data, rate = _decode_chain(path, links)
        if data.size == 0:
            raise ValueError(f"{path}: the file holds no audio samples (a chained Ogg file none of whose links "
                             "decode to audio)")
        return data, rate
    declared = None  # FLAC: the samples its STREAMINFO declares
    try:
        with sf.SoundFile(path) as f:
            if f.format == "FLAC" and 0 < f.frames < UNKNOWN_64_BIT_SIZES[0]:  # INT64_MAX: length not recorded
                declared = f.frames
            data, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or TypeError by format
        data, rate = _decode_with_pyav(path, reason=str(exc))
    else:
        if data.shape[0] == 0 and unwritten_wav_sizes(path):  # libsndfile reads none of it, FFmpeg all
            data, rate = _decode_with_pyav(path, reason="its writer stopped before writing the data chunk's size")
    # A FLAC file cut at a frame boundary, or with a corrupt frame: libsndfile fails on it, and FFmpeg
    # decodes up to the cut, or drops the frame its parser finds broken
    if declared is not None and data.shape[0] < declared:
        raise ValueError(f"{path}: truncated or corrupt FLAC file (its header declares {declared} samples per "
                         f"channel, the file holds {data.shape[0]} that decode)")
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the file holds no audio samples (empty, cut before its first audio frame, or "
                         "not audio)")
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], int(rate)


UNKNOWN_WAV_SIZES = (0, 0x7FFFF000, 0x7FFFFFFF, 0xFFFFFFFF)  # 0x7FFFF000: arecord; 0xFFFFFFFF (-1): FFmpeg
UNKNOWN_64_BIT_SIZES = (2**63 - 1, 2**64 - 1)  # FFmpeg writing Wave64 to a pipe: INT64_MAX
W64_RIFF = bytes.fromhex("726966662e91cf11a5d628db04c10000")  # Sony Wave64's "riff" GUID


@dataclass(frozen=True)
class ChunkLayout:
    """How a container's chunks are laid out: a chunk is an id, a size, then the size's bytes."""

    name: str
    data: bytes  # the audio data chunk's id (its first 4 bytes)
    order: str = "little"
    id_bytes: int = 4
    size_bytes: int = 4
    align: int = 2
    size_counts_header: bool = False  # Wave64's sizes include the chunk's own id and size


WAV, RIFX, RF64 = ChunkLayout("WAV", b"data"), ChunkLayout("WAV", b"data", "big"), ChunkLayout("RF64", b"data")
AIFF = ChunkLayout("AIFF", b"SSND", "big")
W64 = ChunkLayout("Wave64", b"data", id_bytes=16, size_bytes=8, align=8, size_counts_header=True)
CAF = ChunkLayout("CAF", b"data", "big", size_bytes=8, align=1)


def truncation(path: str) -> str | None:
    """What is missing from a file whose header declares more audio data than the file holds
    (WAV, RF64, AIFF, Wave64, CAF), else None. libsndfile reads such a file up to where it ends
    without saying so. The sizes in UNKNOWN_WAV_SIZES and UNKNOWN_64_BIT_SIZES, and CAF's -1, are
    a stream's "unknown length" (arecord or FFmpeg writing to a pipe), not a truncation; a header
    that cannot be walked is left to the decoder."""
    try:
        f = open(path, "rb")
    except OSError:  # unreadable: the decoder reports it
        return None
    with f:
        head = f.read(16)
        if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
            layout, start = {b"RIFF": WAV, b"RIFX": RIFX, b"RF64": RF64}[head[:4]], 12
        elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            layout, start = AIFF, 12
        elif head == W64_RIFF:
            layout, start = W64, 40  # the riff chunk's GUID and size, then the "wave" GUID
        elif head[:4] == b"caff":
            layout, start = CAF, 8
        elif head[:4] in (b".snd", b"dns."):  # Sun/NeXT AU (big-endian), or DEC's little-endian variant
            problem = _au_shortfall(head, os.fstat(f.fileno()).st_size)
            return f"truncated AU file ({problem})" if problem else None
        elif head[:8] == b"NIST_1A\n":  # NIST SPHERE (.sph, .nist: TIMIT and other corpora)
            problem = _sphere_shortfall(head + f.read(4096), os.fstat(f.fileno()).st_size)
            return f"truncated NIST SPHERE file ({problem})" if problem else None
        else:
            return None
        f.seek(start)
        problem = _data_shortfall(f, os.fstat(f.fileno()).st_size, layout)
    return f"truncated {layout.name} file ({problem})" if problem else None


def unwritten_wav_sizes(path: str) -> bool:
    """Whether path is a WAV whose writer stopped before writing its sizes (GStreamer's wavenc without
    EOS): its data chunk declares 0 bytes, and audio follows that the RIFF size does not cover (an empty
    WAV with a LIST chunk after its data chunk declares that chunk in its RIFF size)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return False
        riff_size, file_size = int.from_bytes(head[4:8], "little"), os.fstat(f.fileno()).st_size
        while len(header := f.read(8)) == 8:
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                return size == 0 and f.tell() < file_size and (riff_size in UNKNOWN_WAV_SIZES or riff_size + 8 <= f.tell())
            f.seek(size + size % 2, os.SEEK_CUR)
    return False


def _data_shortfall(f, file_size: int, layout: ChunkLayout) -> str | None:
    header_bytes = layout.id_bytes + layout.size_bytes
    unknown = UNKNOWN_WAV_SIZES if layout.size_bytes == 4 else UNKNOWN_64_BIT_SIZES
    ds64_data_size = None  # RF64: the data chunk's real size, from its ds64 chunk
    while True:
        header = f.read(header_bytes)
        if len(header) < header_bytes:
            return None
        chunk = header[:4]
        if not all(32 <= c < 127 for c in chunk):  # not a chunk id (zeros of a preallocated file, garbage)
            return None
        raw = int.from_bytes(header[layout.id_bytes:], layout.order, signed=layout is CAF)
        size = raw - header_bytes if layout.size_counts_header else raw
        if chunk == layout.data:
            if layout is RF64 and raw == 0xFFFFFFFF and ds64_data_size is not None:
                raw = size = ds64_data_size
                unknown = UNKNOWN_64_BIT_SIZES
            if raw in unknown or size < 0:
                return None
            available = file_size - f.tell()
            return f"its {chunk.decode()} chunk declares {size} bytes, the file holds {available}" if available < size else None
        if size < 0 or size > file_size - f.tell():  # not a size, or past the file's end: no data chunk to check
            return None
        if chunk == b"ds64" and layout is RF64 and size >= 16:
            ds64_data_size = int.from_bytes(f.read(16)[8:], "little")
            size -= 16
        f.seek(size + (-size % layout.align), os.SEEK_CUR)


def _au_shortfall(head: bytes, file_size: int) -> str | None:
    """AU: a data offset and a data size (0xFFFFFFFF: unknown, as a pipe writer leaves it)."""
    order = "big" if head[:4] == b".snd" else "little"
    offset, size = int.from_bytes(head[4:8], order), int.from_bytes(head[8:12], order)
    if size == 0xFFFFFFFF or offset < 24 or offset > file_size:
        return None  # unknown length, or no header to trust: the decoder's call
    available = file_size - offset
    return f"its header declares {size} bytes of audio, the file holds {available}" if available < size else None


def _sphere_shortfall(head: bytes, file_size: int) -> str | None:
    """NIST SPHERE: a text header of its own size that declares sample_count (per channel),
    channel_count and sample_n_bytes; compressed (shorten) files are left to the decoder."""
    lines = head.split(b"\n")
    try:
        header_size = int(lines[1])
    except (IndexError, ValueError):
        return None
    fields = {}
    for line in lines[2:]:
        if line.strip() == b"end_head":
            break
        parts = line.split(None, 2)
        if len(parts) == 3:
            fields[parts[0]] = parts[2].strip()
    try:
        count = int(fields[b"sample_count"])
        channels = int(fields.get(b"channel_count", b"1"))
        width = int(fields[b"sample_n_bytes"])
    except (KeyError, ValueError):
        return None
    coding = fields.get(b"sample_coding", b"pcm").lower()
    if b"shorten" in coding or b"wavpack" in coding or b"shortpack" in coding or min(count, channels, width) <= 0:
        return None
    size, available = count * channels * width, file_size - header_size
    return f"its header declares {size} bytes of audio, the file holds {available}" if available < size else None


def _decode_chain(path: str, links: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """A chained Ogg's links decoded one by one (libsndfile decodes only the first), each mixed to mono
    and resampled to the first one's rate: 1-D float32 and that rate."""
    import soundfile as sf

    parts, first_rate = [], None
    with open(path, "rb") as f:
        for i, (start, end) in enumerate(links):
            f.seek(start)
            link = io.BytesIO(f.read(end - start))
            try:
                with sf.SoundFile(link) as s:
                    data, rate = s.read(dtype="float32", always_2d=True), s.samplerate
            except Exception as exc:  # as in load_audio: Ogg FLAC, or a link libsndfile cannot read
                link.seek(0)
                # libsndfile's message names the BytesIO object: the link is named here instead
                reason = f"link {i + 1} of {len(links)}, at byte {start}: {getattr(exc, 'error_string', exc)}"
                data, rate = _decode_with_pyav(path, reason=reason, source=link)
            first_rate = first_rate or rate
            parts.append(resample(data.mean(axis=1), rate, first_rate))
    return np.concatenate(parts), int(first_rate)


def _decode_with_pyav(path: str, reason: str, source: io.BytesIO | None = None) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the rate, through FFmpeg (from ``source`` when given, a part of
    the file at path); ValueError when that fails too."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: cannot decode audio ({reason}); installing PyAV (pip install av) "
                         "adds the formats FFmpeg reads") from None
    try:
        with av.open(path if source is None else source) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context.name == "flac":  # FFmpeg skips FLAC's frame CRCs unless told to check them
                stream.codec_context.options = {"err_detect": "crccheck+explode"}
            rate = stream.codec_context.sample_rate
            # Planar float32 at the stream's own rate and layout: (channels, samples) per frame.
            planar = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
            blocks = [out.to_ndarray() for frame in container.decode(stream) for out in planar.resample(frame)]
            blocks += [out.to_ndarray() for out in planar.resample(None)]
    except Exception as exc:  # FFmpeg errors come as many types
        raise ValueError(f"{path}: cannot decode audio ({reason}; FFmpeg: {exc})") from None
    if not blocks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(blocks, axis=1).T.astype(np.float32), rate


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling with soxr; float32 in, float32 out."""
    if rate == target:
        return audio
    import soxr

    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32, copy=False)


def check_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer, float, np.floating)):
        raise TypeError(f"sample_rate must be an int in Hz, got {type(sample_rate).__name__}")
    if isinstance(sample_rate, (float, np.floating)):  # 16e3 is 16000; 22050.5 is no rate soxr takes
        if not float(sample_rate).is_integer():
            raise ValueError(f"sample_rate must be a whole number of Hz, got {sample_rate}")
        sample_rate = int(sample_rate)
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(f"sample_rate {sample_rate} Hz is outside the supported range {MIN_RATE}-{MAX_RATE} Hz")
    return int(sample_rate)


def as_pcm_array(x, what: str, takes_paths: bool = True) -> np.ndarray:
    """A numpy array or tensor of a supported sample type, as numpy; TypeError otherwise (naming a
    path as an alternative where the caller ``takes_paths``)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{what}: complex tensors are not audio")
        if x.is_meta:
            raise TypeError(f"{what}: a tensor on the meta device holds no samples")
        if x.is_nested:
            raise TypeError(f"{what}: a nested tensor; pass its items as a list of 1-D tensors (x.unbind())")
        if x.layout != torch.strided:
            raise TypeError(f"{what}: a {x.layout} tensor; pass a dense one (x.to_dense())")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16, torch.int32):
            raise TypeError(f"{what}: unsupported sample type {x.dtype}; expected float16/32/64, bfloat16, "
                            "int16 or int32 PCM")
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    if isinstance(x, np.ma.MaskedArray):
        if np.ma.is_masked(x):  # its mask would be dropped silently
            raise TypeError(f"{what}: a masked array with masked samples; fill them first (x.filled(0))")
        x = np.ma.getdata(x)
    if isinstance(x, np.matrix):  # its rows stay 2-D, so each would read as one sample
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        kinds = "a numpy array, a torch tensor or a path" if takes_paths else "a numpy array or a torch tensor"
        raise TypeError(f"{what}: expected {kinds}, got {type(x).__name__}")
    if x.dtype.type not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: unsupported sample type {x.dtype}; expected float16/32/64, int16 or int32 PCM")
    if not x.dtype.isnative:  # big-endian PCM: the native core and the dtype checks expect native order
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def finite_float32(x: np.ndarray, what: str) -> np.ndarray:
    """Float samples as float32; ValueError when they hold NaN or Inf or pass float32's range."""
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])  # the sample (row) of a (samples, channels) block too
        raise ValueError(f"{what}: audio contains NaN or Inf (first at sample {bad})")
    if x.dtype == np.float32:
        return x
    with np.errstate(over="ignore"):
        single = x.astype(np.float32)
    if not np.isfinite(single).all():  # float64 samples
        raise ValueError(f"{what}: the samples reach {np.abs(x).max():.3g}, beyond float32's range (audio is "
                         "expected within [-1, 1])")
    return single


def _clean(x: np.ndarray, what: str, rate: int, min_samples: int) -> np.ndarray:
    """One item at 16 kHz: int16/int32 PCM stays as it is (the frontend scales it in its single
    pass); float PCM becomes finite float32; anything else at another rate is resampled."""
    if x.size == 0:
        raise ValueError(f"{what}: empty audio (0 samples)")
    if x.dtype.kind == "f":
        x = finite_float32(x, what)
    if rate != SAMPLE_RATE:
        original = x
        x = resample(pcm_to_float32(x), rate)
        if not np.isfinite(x).all():  # samples near float32's limit overshoot it in the filter
            raise ValueError(f"{what}: resampling to 16 kHz overflows float32 (the samples reach "
                             f"{np.abs(original).max():.3g}; audio is expected within [-1, 1])")
    if len(x) < min_samples:
        raise ValueError(f"{what}: {len(x)} samples at 16 kHz; this model needs at least {min_samples} samples "
                         f"({1000 * min_samples / SAMPLE_RATE:g} ms) for one frame")
    return np.ascontiguousarray(x)


def to_waveforms(audio, sample_rate: float = SAMPLE_RATE, min_samples: int = 1) -> list[np.ndarray]:
    """Any supported input -> list of 1-D arrays at 16 kHz (float32, or int16/int32 PCM as given),
    each at least ``min_samples`` long.

    audio: a 1-D array/tensor (one item), a 2-D array/tensor (batch, samples), a list of 1-D
    arrays of different lengths, a path, or a list of paths. ``sample_rate`` applies to arrays;
    files carry their own rate.
    """
    if isinstance(audio, (str, os.PathLike)):
        audio = [audio]
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        x = as_pcm_array(audio, "audio")
        if x.ndim == 1:
            items = [x]
        elif x.size == 0:  # (1, 0), (0, 400), (0, 2): no samples, whatever the layout was meant to be
            raise ValueError(f"audio: empty audio (shape {tuple(x.shape)})")
        elif x.ndim == 2:
            # rows this short never make a frame at any rate; rows too short for this model, when there
            # are more of them than samples in each, are far likelier channels than a batch
            too_short = x.shape[1] * SAMPLE_RATE / check_rate(sample_rate) < min_samples
            if x.shape[1] < x.shape[0] and (x.shape[1] <= MAX_CHANNELS or too_short):
                raise ValueError(f"audio: shape {tuple(x.shape)} looks like (samples, channels), but 2-D audio is "
                                 "(batch, samples): mix it down to mono (audio.mean(axis=1)) or pass audio.T")
            items = list(x)
        else:
            raise ValueError(f"audio: expected 1-D (samples) or 2-D (batch, samples), got shape {tuple(x.shape)}")
        rates = [check_rate(sample_rate)] * len(items)
        names = ["audio"] if x.ndim == 1 else [f"audio[{i}]" for i in range(len(items))]
    elif isinstance(audio, Sequence) and not isinstance(audio, (bytes, bytearray)):
        if len(audio) == 0:
            raise ValueError("audio: empty list")
        if isinstance(audio[0], (int, float, np.number)):  # a list is a batch of items, not one item's samples
            raise TypeError("audio: a list holds items (arrays, tensors or paths), and this one holds numbers: pass "
                            "one item's samples as an array, e.g. np.asarray(samples, dtype=np.float32)")
        items, rates, names = [], [], []
        for i, item in enumerate(audio):
            if isinstance(item, (str, os.PathLike)):
                data, rate = load_audio(item)
                try:
                    rates.append(check_rate(rate))
                except ValueError as exc:
                    raise ValueError(f"{os.fspath(item)}: {exc}") from None
                items.append(data)
                names.append(os.fspath(item))
                continue
            x = as_pcm_array(item, f"audio[{i}]")
            if x.ndim != 1:
                raise ValueError(f"audio[{i}]: empty audio (shape {tuple(x.shape)})" if x.size == 0 else
                                 f"audio[{i}]: items of a list must be 1-D, got shape {tuple(x.shape)}")
            items.append(x)
            rates.append(check_rate(sample_rate))
            names.append(f"audio[{i}]")
    else:
        raise TypeError(f"audio: expected a numpy array, a torch tensor, a list or a path, got {type(audio).__name__}")
    return [_clean(x, name, rate, min_samples) for x, name, rate in zip(items, names, rates)]


def find_audio_files(paths: Sequence[str], unlisted: dict[str, str] | None = None) -> list[str]:
    """Files named directly, plus audio files found recursively under directories (sorted). Entries
    that are not regular files (a broken link, a named pipe) are listed too, so that load_audio
    reports them instead of their being skipped unseen; nothing opens them. Folders that cannot be
    listed go to ``unlisted``, real path -> "folder: why", once however often they are reached (an
    error when it is None)."""

    def not_listed(exc: OSError) -> None:
        why = f"{exc.filename}: cannot list this folder ({exc.strerror}); its files were not found"
        if unlisted is None:
            raise ValueError(why)
        unlisted.setdefault(os.path.realpath(exc.filename), why)

    found = []
    for path in paths:
        if os.path.isdir(path):
            seen = set()  # real paths of the directories walked: a link back up must not loop
            for root, dirs, files in os.walk(path, onerror=not_listed, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                # Real directories before links, so a directory reached both ways is named by its own path.
                dirs.sort(key=lambda d: (os.path.islink(os.path.join(root, d)), d))
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(AUDIO_EXTENSIONS)]
        elif os.path.isfile(path):
            found.append(path)
        elif os.path.exists(path):
            raise ValueError(f"{path}: not a regular file (a pipe or device cannot be read twice, and embed reads "
                             "each file's header before its audio)")
        elif os.path.islink(path):
            raise ValueError(f"{path}: a link that leads to no file")
        else:
            raise ValueError(f"{path}: no such file or directory")
    return found
