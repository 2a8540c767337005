"""Tasks: named functions from a DataFrame (and validated params) to a result.

``@task`` registers a function in the process-wide registry, the way a module of tasks is
imported by the API and by every worker process alike. Params are described by the function's
own signature: everything after the first (the DataFrame) becomes a field of a pydantic model
that forbids unknown keys, so a bad submit is refused before anything is stored.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

F = TypeVar("F", bound=Callable[..., Any])


class PermanentError(Exception):
    """Raised by a task when trying again cannot help (bad data, a bad request): the job
    fails at once, without using up its remaining attempts."""


class TaskDefinitionError(TypeError):
    """A function cannot be a task as written (say, it takes ``*args``)."""


@dataclass(frozen=True)
class Task:
    name: str
    func: Callable[..., Any]
    params_model: type[BaseModel]
    max_attempts: int | None
    timeout: float | None
    retry_delay: float | None
    description: str

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params as they are stored: validated, defaults filled in, JSON types only.

        Raises ``pydantic.ValidationError``.
        """
        return self.params_model.model_validate(params).model_dump(mode="json")

    def params_schema(self) -> dict[str, Any]:
        return self.params_model.model_json_schema()

    def call(self, data: Any, params: dict[str, Any]) -> Any:
        model = self.params_model.model_validate(params)
        kwargs = {name: getattr(model, name) for name in type(model).model_fields}
        return self.func(data, **kwargs)


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> None:
        existing = self._tasks.get(task.name)
        if existing is not None and existing.func is not task.func:
            # Re-importing the same module is harmless; two functions under one name is a bug.
            same_origin = (existing.func.__module__, existing.func.__qualname__) == (
                task.func.__module__,
                task.func.__qualname__,
            )
            if not same_origin:
                raise TaskDefinitionError(f"a task named {task.name!r} is already registered")
        self._tasks[task.name] = task

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def all(self) -> list[Task]:
        return sorted(self._tasks.values(), key=lambda t: t.name)


registry = Registry()


def params_model_for(name: str, func: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of every parameter after the first (the input data)."""
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    if not parameters:
        raise TaskDefinitionError(f"task {name!r} must take the input data as its first argument")
    try:
        hints = get_type_hints(func, include_extras=True)
    except Exception:  # an annotation that does not resolve: treat it as Any
        hints = {}
    fields: dict[str, Any] = {}
    for parameter in parameters[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TaskDefinitionError(
                f"task {name!r}: *args and **kwargs cannot be validated; name each parameter"
            )
        annotation = hints.get(parameter.name, Any)
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    model_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Task"
    return create_model(f"{model_name}Params", __config__=ConfigDict(extra="forbid"), **fields)


def task(
    name: str | None = None,
    *,
    max_attempts: int | None = None,
    timeout: float | None = None,
    retry_delay: float | None = None,
) -> Callable[[F], F]:
    """Register a function as a task.

    ``max_attempts``, ``timeout`` (seconds an attempt may run) and ``retry_delay`` (seconds
    before the first retry; each later one waits twice as long) are its defaults; a submit may
    override ``max_attempts`` and ``retry_delay``.
    """

    def register(func: F) -> F:
        task_name = name or func.__name__
        registry.add(
            Task(
                name=task_name,
                func=func,
                params_model=params_model_for(task_name, func),
                max_attempts=max_attempts,
                timeout=timeout,
                retry_delay=retry_delay,
                description=inspect.getdoc(func) or "",
            )
        )
        return func

    return register


def function_path(func: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, the name a worker imports it by.

    Raises ``TaskDefinitionError`` saying why a callable cannot be run by another process.
    """
    name = getattr(func, "__qualname__", None)
    module = getattr(func, "__module__", None)
    if not inspect.isfunction(func) or name is None or module is None:
        raise TaskDefinitionError(
            f"{func!r} is not a plain function; jobs run module-level functions by name"
        )
    if name == "<lambda>":
        raise TaskDefinitionError("a lambda cannot run in another process; use a named function")
    if "<locals>" in name:
        raise TaskDefinitionError(
            f"{name} is defined inside another function (a closure); workers can only import "
            "module-level functions"
        )
    if module == "__main__":
        raise TaskDefinitionError(
            f"{name} is defined in the __main__ script; workers import functions by module, so "
            "move it into an importable module"
        )
    if resolve_function(f"{module}:{name}") is not func:
        raise TaskDefinitionError(f"{module}.{name} cannot be imported by that name")
    return f"{module}:{name}"


def resolve_function(path: str) -> Callable[..., Any]:
    """The function named ``module:qualname``."""
    module_name, _, qualname = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TaskDefinitionError(f"{path} is not callable")
    return cast(Callable[..., Any], target)


def task_for(func: Callable[..., Any]) -> Task | None:
    """The registered task whose function is ``func``, if any."""
    return next((t for t in registry.all() if t.func is func), None)


def import_task_modules(modules: Iterable[str]) -> None:
    """Import the built-in tasks and the user's modules, so their ``@task``s register."""
    importlib.import_module("jobsvc.tasks.builtin")
    for module in modules:
        importlib.import_module(module)


__all__ = [
    "PermanentError",
    "Registry",
    "Task",
    "TaskDefinitionError",
    "ValidationError",
    "function_path",
    "import_task_modules",
    "registry",
    "resolve_function",
    "task",
    "task_for",
]
