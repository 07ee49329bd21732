# ruff: noqa: B008  (FastAPI declares parameters through call defaults: File, Form, Depends)
"""MONAI Label's infer and label-upload routes as this app serves them.

MONAI Label 0.8.5 declares them ``async`` but runs the work inline, so one inference holds the event loop and even
``/info/`` waits for it; a malformed ``params`` JSON or an unknown model is a bare 500; ``image=`` may name any file
on the server. The replacements keep MONAI Label's own request handling (the same functions, parameters and access
roles) and run it in a worker thread, after checking model, params and image.
"""

from __future__ import annotations

import json
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, UploadFile
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_routes
from monailabel.endpoints import infer as infer_routes
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool

from lib.datastore import refuse

API = settings.MONAI_LABEL_API_STR


def checked_params(params: str | None, what: str) -> None:
    try:
        value = json.loads(params) if params else {}
    except json.JSONDecodeError as err:
        raise refuse(400, f"{what}: params is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise refuse(400, f"{what}: params must be a JSON object, got {type(value).__name__}")


async def run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,  # noqa: UP045 (FastAPI reads the annotation)
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    instance = app_instance()
    models = instance.info()["models"]
    if model not in models:
        raise refuse(404, f"model {model!r} is not served here; models: {sorted(models)}")
    checked_params(params, f"infer {model}")
    if image and not file and not session_id and image not in instance.datastore().list_images():
        raise refuse(404, f"image {image!r} is not a study of this datastore (give a study id, or upload the file)")
    return await run_in_threadpool(
        infer_routes.run_inference, background_tasks, model, image, session_id, params, file, label, output
    )


async def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    checked_params(params, f"label of {image}")
    return await run_in_threadpool(
        datastore_routes.save_label, background_tasks, image, params, tag, label, user.username
    )


async def add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,  # noqa: UP045
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    checked_params(params, f"image {image}")
    return await run_in_threadpool(datastore_routes.add_image, background_tasks, image, params, file, user.username)


REPLACED = {
    ("POST", f"{API}/infer/{{model}}"): run_inference,
    ("PUT", f"{API}/datastore/label"): save_label,
    ("PUT", f"{API}/datastore/image"): add_image,
    ("PUT", f"{API}/datastore/"): add_image,
}


def install(app: FastAPI) -> None:
    """Put the routes in ``REPLACED`` in front of MONAI Label's: the first route that matches a request answers it."""
    router = APIRouter()
    for (method, path), endpoint in REPLACED.items():
        router.add_api_route(path, endpoint, methods=[method], response_model=None)
    app.include_router(router)
    app.router.routes.insert(0, app.router.routes.pop())
