"""The agent's route that shows its model cache: what it holds, its limit, and its pulls, hits and evictions."""

from __future__ import annotations

from agent.cache import CacheUsage, ModelCache
from miaas.identity import ADMIN, CONTROLLER, FRONTEND
from miaas.web import Api


def build_cache_api(cache: ModelCache) -> Api:
    api = Api("agent_model_cache", allow=(CONTROLLER, FRONTEND, ADMIN))

    @api.route("/model-cache", response=CacheUsage)
    def model_cache() -> CacheUsage:
        """The versions pulled over HTTP into this agent's model cache (most recently used first), the bytes they
        hold of the limit (AGENT_MODEL_CACHE_MAX_BYTES), and the pulls, hits and evictions since the agent
        started."""
        return cache.usage()

    return api
