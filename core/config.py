"""Every setting of the project, read from the environment (prefix ``UNICHAR_``) or ``.env``.

The defaults let a fresh machine run with nothing set up: an SQLite file and a file store under ``./var``,
Redis on localhost, and the tiny random model that ``unichar model init --tiny`` writes. Secrets (bot tokens)
are ``SecretStr`` so that they never show up in a repr or a log line. Tests build their own ``Settings(...)``
instead of patching globals.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["IMAGE_PRESETS", "Settings", "get_settings"]

# (width, height, steps); "preview" is what the tiny random model draws on a CPU in a few seconds
IMAGE_PRESETS: dict[str, tuple[int, int, int]] = {
    "full": (1024, 1024, 50),
    "fast": (512, 512, 20),
    "preview": (256, 256, 12),
}


class Settings(BaseSettings):
    """The one settings object; each field is one ``UNICHAR_<NAME>`` environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="UNICHAR_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- stores -------------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Folder for the SQLite file, the file store and the tiny model.")
    database_url: str = Field(
        "", description="SQLAlchemy URL of the SQL store; empty means an SQLite file `<data_dir>/unichar.db`."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Redis: Celery broker and per-job event streams. Installations may share one Redis database: every "
            "key carries the SQL store's own token (`broker:TOKEN:chat`, `job:TOKEN:ID`)."
        ),
    )
    private_redis: bool = Field(
        True, description="`unichar run` starts its own redis-server under data_dir when redis_url does not answer."
    )

    # --- model --------------------------------------------------------------------------------------------
    model_dir: Path | None = Field(
        None, description="BAGEL-7B-MoT folder (official layout); empty means the tiny model under data_dir."
    )
    checkpoint: Path | None = Field(
        None, description="Optional UniCharacter checkpoint (SFT model.safetensors or GRPO LLM-only file)."
    )
    vit_checkpoint: Path | None = Field(
        None, description="Checkpoint whose ViT, connector and heads are merged into a GRPO LLM-only checkpoint."
    )
    device: str = Field("auto", description="Torch device for the model: auto, cpu, cuda, cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Model dtype; auto means bfloat16 on GPU and float32 on CPU."
    )
    image_fp8: Literal["auto", "on", "off"] = Field(
        "off",
        description="Generation expert's matrix products in FP8: images 1.36x faster on an H100, no longer the "
        "official bf16 outputs (bench/RESULTS.md measures the error); auto means on for GPUs with FP8 tensor cores "
        "(compute capability 8.9+).",
    )
    max_reply_tokens: int = Field(400, ge=1, le=4096, description="Most new tokens in one chat reply.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature of chat replies.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold of chat replies.")
    context_tokens: int = Field(4096, ge=256, description="Token budget of one assembled prompt.")
    image_width: int = Field(1024, ge=64, le=1024, multiple_of=16, description="Width of generated images.")
    image_height: int = Field(1024, ge=64, le=1024, multiple_of=16, description="Height of generated images.")
    image_steps: int = Field(50, ge=2, le=200, description="Flow-matching timesteps per generated image.")
    image_preset: Literal["auto", "full", "fast", "custom"] = Field(
        "auto",
        description="Picture size and steps: full (1024 px, 50 steps), fast (512 px, 20 steps), custom "
        "(image_width, image_height, image_steps); auto is custom when any of those is set, else full with model_dir "
        "set, else a 256 px, 12-step preview (the tiny model on a CPU).",
    )

    # --- pictures in replies (issue 8) ----------------------------------------------------------------------
    auto_image_every: int = Field(
        4, ge=1, description="With the auto policy, at least this many replies between two pictures in a chat."
    )
    image_quota_user_per_day: int = Field(20, ge=0, description="Pictures one user may get in 24 hours.")
    image_quota_chat_per_day: int = Field(100, ge=0, description="Pictures one chat may get in 24 hours (0: no cap).")
    image_context_tokens: int = Field(
        12288, ge=0, description="Context tokens reference images may take in a scene picture's prompt."
    )
    allow_nsfw_images: bool = Field(False, description="Whether adult pictures may be made at all (then only in age-restricted chats).")
    image_banned_words: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated words that make a picture request refused."
    )
    image_nsfw_words: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nsfw", "nude", "naked", "nudes", "topless", "lewd", "explicit", "porn", "sex"],
        description="Comma-separated words that mark a picture request as adult.",
    )

    # --- jobs ---------------------------------------------------------------------------------------------
    job_timeout_s: int = Field(900, ge=10, description="Longest chat or image job, in seconds.")
    train_timeout_s: int = Field(6 * 3600, ge=60, description="Longest training job, in seconds.")
    max_attempts: int = Field(3, ge=1, le=20, description="Deliveries of one job before it is marked failed.")
    sweep_after_s: int = Field(120, ge=1, description="A job queued this long without a worker is re-sent.")
    sweep_interval_s: int = Field(30, ge=1, description="How often the sweeper looks for lost jobs.")
    worker_threads: int = Field(4, ge=1, le=64, description="Threads of a GPU worker sharing one model engine.")
    worker_cpus: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="CPU cores a chat and image worker keeps to (Linux), as 3 or 2-3 or 1,3; empty: all. Its threads "
        "take turns on one interpreter lock, and on cores of their own they stop handing it from core to core: on "
        "the 2-core test machine one core gave 26-88% more replies per second with SQLite (bench/RESULTS.md). For "
        "GPU workers; a worker that runs the model on the CPU wants every core.",
    )
    event_ttl_s: int = Field(3600, ge=60, description="How long a job's event stream is kept in Redis.")

    # --- input limits -------------------------------------------------------------------------------------
    max_message_chars: int = Field(4000, ge=1, description="Longest user message accepted.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted image upload.")
    max_image_pixels: int = Field(40_000_000, ge=10_000, description="Most pixels in an accepted image.")
    max_images_per_message: int = Field(4, ge=1, le=10, description="Most images accepted in one user message.")
    max_open_jobs: int = Field(3, ge=1, description="Requests one user may have queued or running at once.")
    history_messages: int = Field(
        20, ge=1, description="Most recent turns read into a reply's context (then trimmed to context_tokens)."
    )
    summary_every: int = Field(
        20, ge=2, description="Turns older than the recent window that make the model write a rolling summary."
    )
    recall_turns: int = Field(6, ge=0, le=50, description="Older turns recalled by relevance into a reply's context.")
    lorebook_tokens: int = Field(512, ge=0, description="Token budget of lorebook entries when the card sets none.")

    # --- character submissions and training (issue 7) ------------------------------------------------------
    submission_min_images: int = Field(10, ge=1, le=64, description="Fewest images a /newcharacter submission needs.")
    submission_max_images: int = Field(10, ge=1, le=64, description="Most images a /newcharacter submission takes.")
    submission_dup_distance: int = Field(
        6, ge=0, le=32, description="Perceptual-hash bit distance at or under which two submitted images are duplicates."
    )
    keep_source_images: bool = Field(
        False, description="Keep a submission's source images after its character is published (else deleted)."
    )
    lora_rank: int = Field(64, ge=1, le=1024, description="Rank of a character's LoRA adapter.")
    lora_alpha: float = Field(128.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank.")
    train_steps: int = Field(500, ge=1, description="Optimizer steps of one character's Unified-SFT.")
    train_lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate of a LoRA SFT (2e-5 for a full fine-tune).")
    train_tokens_per_step: int = Field(8192, ge=64, description="Packed sequence tokens per SFT step.")
    train_full_finetune: bool = Field(False, description="Train all weights (the paper's recipe) instead of LoRA.")
    train_checkpoint_every: int = Field(50, ge=1, description="SFT steps between resumable checkpoints.")
    train_image_size: int = Field(
        512, ge=32, le=1024, multiple_of=16, description="Longest side of training images for the VAE (latents)."
    )

    # --- frontends ----------------------------------------------------------------------------------------
    telegram_token: SecretStr | None = Field(None, description="Telegram bot token; the Telegram bot runs when set.")
    telegram_api_url: str | None = Field(
        None, description="Base URL of a local Telegram Bot API server (e.g. http://localhost:8081)."
    )
    telegram_trigger_word: str = Field(
        "", description="In Telegram groups the character also answers messages containing this word (besides mentions and replies)."
    )
    telegram_edit_interval_s: float = Field(
        1.5, gt=0.0, le=60.0, description="Seconds between two edits of a streaming Telegram reply in a private chat."
    )
    telegram_group_edit_interval_s: float = Field(
        3.0, gt=0.0, le=60.0, description="Seconds between two edits of a streaming Telegram reply in a group."
    )
    telegram_album_wait_s: float = Field(
        1.0, gt=0.0, le=10.0, description="How long the Telegram bot waits for the rest of an album before using it."
    )
    telegram_poll_s: float = Field(
        5.0, gt=0.0, le=300.0, description="How often the Telegram bot checks quiet jobs and pending notifications."
    )
    discord_token: SecretStr | None = Field(None, description="Discord bot token; the Discord bot runs when set.")
    public_files_url: str = Field(
        "", description="Public base URL serving the file store (`<url>/<key>`); Discord shows character avatars from it."
    )
    admin_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated admins as platform:user_id (telegram:123, discord:456, console:local).",
    )
    default_character: str = Field("", description="Character a new user starts with; empty means the first one.")
    console_image_dir: Path | None = Field(
        None, description="Where `unichar chat` saves received images; empty means `<data_dir>/images`."
    )
    log_level: str = Field("INFO", description="Logging level of every process.")

    @field_validator("admin_ids", "image_banned_words", "image_nsfw_words", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("worker_cpus", mode="before")
    @classmethod
    def _parse_cpus(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        cpus: list[int] = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            first, dash, last = item.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
                raise ValueError(f"{item!r} is not a core or a range of cores (3, 2-3)")
            cpus.extend(range(int(first), int(last if dash else first) + 1))
        return sorted(set(cpus))

    @field_validator("admin_ids")
    @classmethod
    def _check_admins(cls, value: list[str]) -> list[str]:
        for item in value:
            platform, _, user = item.partition(":")
            if not platform or not user:
                raise ValueError(f"admin id {item!r} must look like platform:user_id")
        return value

    @field_validator("submission_max_images")
    @classmethod
    def _check_image_bounds(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("submission_min_images", 1)
        if value < low:
            raise ValueError(f"submission_max_images ({value}) is below submission_min_images ({low})")
        return value

    @cached_property
    def sql_url(self) -> str:
        """The SQL store's URL, the SQLite file under data_dir when none is set."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'unichar.db').as_posix()}"

    @cached_property
    def files_dir(self) -> Path:
        """Root of the content-addressed file store (images, adapters)."""
        return self.data_dir / "files"

    @cached_property
    def resolved_console_image_dir(self) -> Path:
        """Where the terminal chat saves pictures: the configured folder, or one under data_dir (beside the rest
        of this installation's data, wherever data_dir points)."""
        return self.console_image_dir or self.data_dir / "images"

    @cached_property
    def resolved_model_dir(self) -> Path:
        """The model folder to load: the configured one, or the tiny model under data_dir."""
        return self.model_dir or self.data_dir / "models" / "tiny"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(width, height, steps) of generated pictures under ``image_preset``."""
        custom = {"image_width", "image_height", "image_steps"} & self.model_fields_set
        if self.image_preset == "custom" or (self.image_preset == "auto" and custom):
            return self.image_width, self.image_height, self.image_steps
        preset = self.image_preset if self.image_preset != "auto" else ("full" if self.model_dir else "preview")
        return IMAGE_PRESETS[preset]

    def is_admin(self, platform: str, user_id: str) -> bool:
        """Whether this platform identity is a configured admin."""
        return f"{platform}:{user_id}" in self.admin_ids


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings
