"""Dependencies as `Annotated` aliases: a route's signature reads like a type declaration,
and tests can swap any of them with `app.dependency_overrides`.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request

from service.api.auth import API_KEY_HEADER, check_write_key
from service.api.errors import ProblemError
from service.api.schemas import ImageSearchRequest, SearchOptions
from service.outcomes import FieldProblem, InvalidInput
from service.runtime.lifecycle import ServiceRuntime, ServiceState
from service.runtime.settings import Settings

STARTING_RETRY_AFTER_S = 5

OptionsT = TypeVar("OptionsT", bound=SearchOptions)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.service.settings


def get_runtime(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceRuntime:
    """The loaded service, or 503 (with Retry-After while it is still loading)."""
    if state.runtime is not None:
        return state.runtime
    if state.phase == "failed":
        raise ProblemError(
            503, "Service unavailable", f"the service failed to start: {state.error}"
        )
    detail = "the model and indexes are still loading; retry shortly"
    if state.waiting_for_database:
        detail = f"waiting for the database: {state.waiting_for_database}"
    raise ProblemError(
        503, "Service starting", detail, headers={"Retry-After": str(STARTING_RETRY_AFTER_S)}
    )


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]


def require_write_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None,
) -> None:
    """Writes need a valid `X-API-Key` when keys are configured (401 otherwise)."""
    check_write_key(x_api_key, settings.api_keys)


WriteAccess = Depends(require_write_key)


def check_search_bounds(
    options: OptionsT, settings: Settings, *, location: str = "body"
) -> OptionsT:
    """The options within the bounds that come from settings.

    An explicit value above a bound is a 422 naming the field; a default above it (a
    deployment with `max_candidates` below 100) is lowered to the bound.
    """
    problems = []
    adjusted: dict[str, int] = {}
    for name, bound in (("limit", settings.max_limit), ("candidates", settings.max_candidates)):
        value = getattr(options, name)
        if value <= bound:
            continue
        if name in options.model_fields_set:
            problems.append(FieldProblem(f"{location}.{name}", f"must be at most {bound}"))
        else:
            adjusted[name] = bound
    if isinstance(options, ImageSearchRequest) and len(options.text) > settings.max_query_chars:
        problems.append(
            FieldProblem(
                f"{location}.text",
                f"has {len(options.text)} characters; the limit is {settings.max_query_chars}",
            )
        )
    if problems:
        raise InvalidInput(problems)
    return options.model_copy(update=adjusted) if adjusted else options
