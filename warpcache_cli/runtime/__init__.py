"""Attach the caching policy to a live diffusers pipeline or transformer, and detach it."""

from __future__ import annotations

from typing import Any

from diffusers.hooks import HookRegistry

from warpcache_cli.config import Config
from warpcache_cli.errors import ModelError
from warpcache_cli.runtime.adapters import adapter_for, block_io, find_blocks, find_transformer
from warpcache_cli.runtime.hooks import BlockHook, StepHook
from warpcache_cli.runtime.session import BlockObserver, CacheSession, Decision, RuntimeStats

HOOK_NAME = "warpcache"
_SESSION_ATTR = "_warpcache_session"

__all__ = ["apply", "remove", "session_of", "CacheSession", "Decision", "RuntimeStats"]


def apply(pipe_or_transformer: Any, config: Config, observer: BlockObserver | None = None) -> CacheSession:
    """Hook every transformer block so reused blocks are really skipped; returns the live session.

    Works on a diffusers pipeline (its `transformer`) or a bare transformer. Apply once;
    call `remove` before applying another config. With `profiler.auto_profile` the session profiles,
    tunes and switches policies by itself (`warpcache_cli.autoprofile`).
    """
    transformer = find_transformer(pipe_or_transformer)
    if getattr(transformer, _SESSION_ATTR, None) is not None:
        raise ModelError("warpcache is already applied to this transformer; call warpcache_cli.remove() first")
    if config.profiler.auto_profile:
        # imported here: auto-profiling builds on this module (profile, tune), not the other way round
        from warpcache_cli.autoprofile import AutoProfiler, check_writable

        check_writable(config.profiler.sensitivity_path)  # fail now, not after minutes of profiling
    blocks = find_blocks(transformer)
    session = CacheSession(config, len(blocks), observer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(StepHook(session, adapter_for(transformer), type(transformer).forward), HOOK_NAME)
    for layer, block in enumerate(blocks):
        hook = BlockHook(session, layer, block_io(block), type(block).forward)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
    registry.invalidate_child_registries_cache()
    setattr(transformer, _SESSION_ATTR, session)
    if config.profiler.auto_profile:
        session.controller = AutoProfiler(session, pipe_or_transformer)
    if session.metrics is not None and config.listen_addr:
        session.server = session.metrics.serve(config.listen_addr)
    return session


def session_of(pipe_or_transformer: Any) -> CacheSession | None:
    return getattr(find_transformer(pipe_or_transformer), _SESSION_ATTR, None)


def remove(pipe_or_transformer: Any) -> CacheSession | None:
    """Detach the hooks and free cached features; returns the session (for its stats), or None."""
    transformer = find_transformer(pipe_or_transformer)
    session = getattr(transformer, _SESSION_ATTR, None)
    if session is None:
        return None
    if session.controller is not None:
        session.controller.detach()
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()
    session.flush_metrics()
    session.store.purge()
    if session.server is not None:
        session.server.shutdown()
        session.server.server_close()
    delattr(transformer, _SESSION_ATTR)
    return session
