"""``streamify generate`` for video denoisers: a block-causal student chunk by chunk, a bidirectional one whole.

A block-causal model (``convert.causal_video``, ``distill.self_forcing``)
generates one chunk at a time over its cache with the few-step schedule
(:func:`~streamify.runtime.video_sampling.denoise_chunk`): the noise of each
chunk is drawn when it starts, the cache holds sinks + window when the model
has them, so memory does not grow with the clip. A bidirectional model samples
the whole clip with Euler steps of its flow ODE. The result reports frames per
second, denoiser evaluations per frame (the passes each frame goes through) and
the cache's bytes after each chunk. With classifier-free guidance every pass
counts twice (the conditional and the unconditional one).

Written into the output folder (created whole or not at all):
``latents.safetensors`` (``latents`` ``[1, C, frames, H, W]``); for a model
that works in RGB pixels (3 channels, as on ``builtin:shapes``), also
``frames/frame-NNNNN.png``, ``video.gif`` (Pillow) and ``video.mp4`` (H.264 through the ffmpeg binary
that the ``imageio-ffmpeg`` wheel ships, near-lossless: CRF 12). A latent-space model
(Wan2.1, 16 channels) gets its frames when its VAE is given (diffusers'
``AutoencoderKLWan``, :func:`load_vae`): the latents are denormalised with the
VAE's ``latents_mean``/``latents_std`` as diffusers' ``WanPipeline`` does and
decoded after the generation one latent frame at a time, through the VAE's own
causal cache, each frame written as it comes: only the GIF's paletted frames are
held for the whole clip, never the clip's float pixels.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from streamify.errors import InputError, Interrupted, ResourceError, UsageError
from streamify.io.atomic import file_written, publish, temp_sibling
from streamify.progress import SILENT, Progress
from streamify.runtime.causal_video import VideoCache
from streamify.runtime.video_sampling import (
    check_rotary_range,
    chunk_length,
    denoise_chunk,
    sample_clip,
    shifted_sigmas,
)

MP4_CRF = "12"  # x264's constant rate factor: 0 is lossless, 18 "visually lossless"; small frames need better
VAE_CLASSES = ("AutoencoderKLWan",)  # diffusers video VAEs with latents_mean / latents_std, decoded as WanPipeline


@dataclass(frozen=True)
class VideoRequest:
    """What to generate: latent frames and size, the student's timesteps or the bidirectional model's steps."""

    frames: int
    height: int
    width: int
    timesteps: tuple[float, ...] = (1000, 750, 500, 250)
    sample_steps: int = 48
    shift: float = 1.0
    seed: int = 0
    euler: bool = False  # a block-causal model follows the flow ODE for sample_steps a chunk (not timesteps)
    guidance: float = 1.0  # classifier-free guidance scale (1: none; else two passes each, one unconditional)


def is_pixel_model(model: nn.Module) -> bool:
    """True for a denoiser that reads and writes RGB pixels (its latents are frames)."""
    return (model.config["in_channels"], model.config["out_channels"]) == (3, 3)


@torch.no_grad()
def generate_video(
    model: nn.Module, condition: torch.Tensor, request: VideoRequest, progress: Progress = SILENT
) -> tuple[torch.Tensor, dict]:
    """The clip's latents ``[1, C, frames, H, W]`` and the run's numbers (module doc)."""
    ctl = getattr(model, "streamify_video", None)
    spec = ctl.spec if ctl is not None else None
    check_rotary_range(model.config, request.frames, request.height, request.width, spec)
    device = next(model.parameters()).device
    shape = (1, model.config["in_channels"], request.frames, request.height, request.width)
    generator = torch.Generator().manual_seed(request.seed)
    condition = condition.to(device)
    branches = 1 if request.guidance == 1.0 else 2
    started = time.perf_counter()
    if getattr(model, "streamify_video", None) is None:
        sigmas = shifted_sigmas(request.sample_steps, request.shift)
        noise = torch.randn(shape, generator=generator).to(device)
        clip, _ = sample_clip(model, noise, condition, sigmas, guidance=request.guidance)
        seconds = time.perf_counter() - started
        return clip.cpu(), {
            "mode": "bidirectional, whole clip",
            "frames": request.frames,
            "guidance": request.guidance,
            "evaluations_per_frame": request.sample_steps * branches,  # denoiser passes each frame goes through
            "seconds": round(seconds, 3),
            "frames_per_s": round(request.frames / max(seconds, 1e-9), 3),
        }
    step = chunk_length(model)
    if request.frames % step:
        raise UsageError(
            f"--frames {request.frames}: a block-causal model generates whole chunks of {step} latent frames",
            f"give a multiple of {step}",
        )
    if request.euler:
        sigmas = shifted_sigmas(request.sample_steps, request.shift)[:-1]
        schedule = {"solver": "euler", "sample_steps": request.sample_steps}
    else:
        sigmas = [t / 1000 for t in request.timesteps]
        schedule = {"solver": "few-step", "timesteps": list(request.timesteps)}
    cache, chunks, held = VideoCache(), [], []
    for _ in progress.track(range(request.frames // step), "chunks", total=request.frames // step):
        noise = torch.randn((*shape[:2], step, *shape[3:]), generator=generator).to(device)
        clean = denoise_chunk(
            model, cache, noise, condition, sigmas, generator=generator, euler=request.euler, guidance=request.guidance
        )
        chunks.append(clean.cpu())
        held.append(cache.nbytes())
    seconds = time.perf_counter() - started
    return torch.cat(chunks, dim=2), {
        "mode": "block-causal, chunk by chunk",
        "frames": request.frames,
        "chunk_frames": step,
        **schedule,
        "guidance": request.guidance,
        "evaluations_per_frame": (len(sigmas) + 1) * branches,  # the levels and the cache re-run
        "seconds": round(seconds, 3),
        "frames_per_s": round(request.frames / max(seconds, 1e-9), 3),
        "cache_bytes_max": max(held),
        "cache_bytes_per_chunk": held,
    }


def check_output(folder: Path) -> None:
    """UsageError unless ``folder`` is new or an empty folder."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} exists and is not an empty folder", "give a new folder to -o")


def load_vae(path: Path, model: nn.Module) -> nn.Module:
    """The diffusers VAE in ``path`` (its folder, or a Wan pipeline folder's ``vae/``) that decodes ``model``'s
    latents, on the model's device in fp32; InputError naming the file when it is not one."""
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    config_file = folder / "config.json"
    hint = "give the folder of diffusers' AutoencoderKLWan (the vae/ folder of a Wan Diffusers checkpoint)"
    if not path.is_dir():
        raise InputError(f"--vae {path}: {'not a folder' if path.exists() else 'does not exist'}", hint)
    if not config_file.is_file():
        raise InputError(f"--vae {path}: no config.json there (nor in vae/)", hint)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{config_file}: not readable JSON ({error})", hint) from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        raise InputError(f"{config_file}: a {name or 'model without _class_name'}, not one of {VAE_CLASSES}", hint)
    channels = config.get("z_dim", 16)  # (AutoencoderKLWan's default)
    if channels != model.config["out_channels"]:
        raise InputError(
            f"{config_file}: the VAE's latents have {channels} channels, the denoiser writes "
            f"{model.config['out_channels']}",
            "give the VAE the denoiser was trained with",
        )
    import diffusers

    try:
        vae = getattr(diffusers, name).from_pretrained(folder, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(f"{folder}: the VAE does not load ({error})", hint) from None
    return vae.to(next(model.parameters()).device).eval()


@torch.no_grad()
def decode_frames(vae: nn.Module, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """``[frames, 3, H, W]`` in [0, 1] for each latent frame of ``latents`` ``[1, C, F, h, w]`` in turn: the
    latents denormalised with the VAE's ``latents_std`` and ``latents_mean`` as diffusers' WanPipeline does,
    decoded one latent frame at a time through the VAE's causal cache, as its own (untiled) ``decode`` loops
    over them, so the frames equal ``decode``'s without the whole clip's pixels in memory. Close it when
    stopping early: the cache lives on the VAE until then."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    weight = next(vae.parameters())
    latents = latents.to(weight.device)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    vae.clear_cache()
    try:
        inputs = vae.post_quant_conv((latents / inverse_std + mean).to(weight.dtype))
        for index in range(inputs.shape[2]):
            vae._conv_idx = [0]
            video = vae.decoder(
                inputs[:, :, index : index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                first_chunk=index == 0,
            )  # fmt: skip
            if vae.config.patch_size is not None:
                video = unpatchify(video, patch_size=vae.config.patch_size)
            yield (video.clamp(-1, 1)[0].permute(1, 0, 2, 3).float().cpu() + 1) / 2
    finally:
        vae.clear_cache()


def write_video(
    latents: torch.Tensor, model: nn.Module, folder: Path, vae: nn.Module | None = None, fps: int = 8
) -> list[str]:
    """Write ``latents`` into the new ``folder``, and frames (PNG, GIF and MP4 at ``fps``) for a pixel model or
    through ``vae``; the names written. When decoding or writing the frames fails (the VAE out of memory, a full
    disk), the generated latents are saved beside ``folder`` first, so that the generation is not lost."""
    check_output(folder)
    tmp = temp_sibling(folder)
    try:
        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
        names = ["latents.safetensors"]
        if vae is not None or is_pixel_model(model):
            from streamify.data.shapes import latents_frames

            with _latents_kept(latents, folder, "the frames could not be decoded or written"):
                if vae is None:
                    count = write_frames([latents_frames(latents)], tmp, fps)
                else:  # closed on a write error too: the VAE's cache is freed at once
                    with contextlib.closing(decode_frames(vae, latents)) as groups:
                        count = write_frames(groups, tmp, fps)
            names += [f"frames/ ({count} PNG)", "video.gif", "video.mp4"]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rmdir()  # empty: the checks above
    publish(tmp, folder)
    return names


@contextlib.contextmanager
def _latents_kept(latents: torch.Tensor, folder: Path, what: str) -> Iterator[None]:
    """On a failure inside (out of memory, a full disk, an encoder that fails) or Ctrl-C, save ``latents``
    beside ``folder`` (never over an earlier run's) and raise ResourceError (exit 4), or Interrupted (exit
    130), naming the file."""
    try:
        yield
    except (RuntimeError, MemoryError, OSError, KeyboardInterrupt) as error:
        kept = folder.with_name(f"{folder.name}.latents.safetensors")
        for attempt in range(2, 1000):
            if not kept.exists():
                break
            kept = folder.with_name(f"{folder.name}.latents-{attempt}.safetensors")
        kept.parent.mkdir(parents=True, exist_ok=True)  # where the output folder would have been made
        with file_written(kept) as partial:
            save_file({"latents": latents.contiguous()}, str(partial))
        decode = (
            "decode them with diffusers' AutoencoderKLWan after denormalising with its latents_mean/latents_std, "
            "as WanPipeline does"
        )
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(
                f"interrupted before the frames were written; {folder} was not written, the generated latents are "
                f"kept in {kept}",
                f"{decode}, or run again",
            ) from None
        raise ResourceError(
            f"{what} ({str(error).splitlines()[0] if str(error) else type(error).__name__}); {folder} was not "
            f"written, the generated latents are kept in {kept}",
            f"{decode} where the VAE fits, generate fewer --frames, or free disk space",
        ) from error


def write_frames(groups: Iterable[torch.Tensor], folder: Path, fps: int) -> int:
    """Frames ``[n, 3, H, W]`` in [0, 1], a group at a time, as ``folder/frames/frame-NNNNN.png``,
    ``folder/video.gif`` and ``folder/video.mp4`` at ``fps``; the number of frames. Each frame is written as
    it comes; the GIF's frames are held until the end, paletted (a byte a pixel), as Pillow writes a GIF.
    OSError when ffmpeg fails to write the MP4."""
    from PIL import Image

    (folder / "frames").mkdir()
    paletted, mp4 = [], None
    try:
        for group in groups:
            for frame in (group.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy():
                image = Image.fromarray(frame)
                image.save(folder / "frames" / f"frame-{len(paletted):05d}.png")
                if mp4 is None:
                    mp4 = Mp4Writer(folder / "video.mp4", frame.shape[1], frame.shape[0], fps)
                mp4.write(frame)
                paletted.append(image.convert("P", palette=Image.Palette.ADAPTIVE))
        mp4.close()
    except BaseException:
        if mp4 is not None:
            mp4.kill()
        raise
    paletted[0].save(folder / "video.gif", save_all=True, append_images=paletted[1:], duration=1000 / fps, loop=0)
    return len(paletted)


class Mp4Writer:
    """An H.264 MP4 (yuv420p, which players expect; an odd side is padded by one pixel) written frame by
    frame by the ffmpeg binary of the ``imageio-ffmpeg`` wheel. :meth:`close` waits for ffmpeg and raises
    OSError with its message when it failed, so a file it could not finish is never taken for a video."""

    def __init__(self, path: Path, width: int, height: int, fps: int) -> None:
        import imageio_ffmpeg

        self.path = path
        # ffmpeg's messages go to a file, which never fills up as a pipe can; close() or kill() closes it
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-crf", MP4_CRF, "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", str(path),
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except BaseException:
            self._log.close()
            raise

    def write(self, frame: np.ndarray) -> None:
        """Send one ``[H, W, 3]`` uint8 frame; OSError when ffmpeg has stopped."""
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self.close()  # raises with ffmpeg's message
            raise OSError(f"ffmpeg stopped reading frames for {self.path}") from None

    def close(self) -> None:
        """Finish the file; OSError with ffmpeg's last message when it exited with an error."""
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        code = self._process.wait()
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        self._log.close()
        if code != 0:
            reason = lines[-1] if lines else f"exit status {code}"
            raise OSError(f"ffmpeg could not write {self.path.name}: {reason}")

    def kill(self) -> None:
        """Stop ffmpeg without finishing the file (the frames failed before it was complete); safe after
        :meth:`close`."""
        self._process.kill()
        self._process.wait()
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        self._log.close()
