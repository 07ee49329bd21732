r"""ppgseg's MONAI Label app: support-set segmentation from 3D Slicer.

    MALLOC_ARENA_MAX=1 monailabel start_server --app monailabel_app --studies <folder> \
        --conf models proxy_prompt --host 127.0.0.1

See README.md beside this file for the options (``--conf``) and the Slicer workflow.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

from fastapi import HTTPException
from lib.activelearning import LeastConfident
from lib.configs import ProxyPromptConfig
from lib.datastore import SafeDatastore
from lib.infers import SliceSupportInfer, StudySupportInfer
from lib.trainers import ProxyPromptTrain
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp

import ppgseg
from ppgseg.runtime import pad_heap
from ppgseg.serving import Study

pad_heap()  # keep freed heap memory: CPU forwards stop paying page faults (see ppgseg/runtime.py)

logger = logging.getLogger(__name__)


def bind_address(argv: list[str]) -> str | None:
    """The ``--host`` / ``-i`` that ``monailabel start_server`` was given, or None when it was left out."""
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def check_bind_address(host: str | None, auth: bool) -> None:
    """Refuse MONAI Label's default of listening on every interface: the studies are patient data."""
    if host is None:
        raise RuntimeError(
            "monailabel start_server listens on all interfaces (0.0.0.0) unless --host is given. Start it with "
            "--host 127.0.0.1 for this machine only, or name the interface explicitly (e.g. --host 0.0.0.0) for a "
            "shared deployment, with MONAI_LABEL_AUTH_ENABLE=true (see monailabel_app/README.md)."
        )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not auth:
        logger.warning(f"listening on {host} without authentication: anyone who reaches it can read the studies")


def check_malloc_arenas(environ: dict[str, str]) -> bool:
    """Warn when the server was started without MALLOC_ARENA_MAX=1 (glibc only): inference runs in worker threads,
    which then get malloc arenas of their own that are handed back to the kernel after each forward and faulted in
    again (background encoding 1.45x slower on 2 cores). glibc reads the variable at process start, so the app cannot
    set it. Returns whether it is set."""
    if environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return True
    logger.warning(
        "MALLOC_ARENA_MAX is not set: worker threads get malloc arenas of their own and encode slower; start the "
        "server as MALLOC_ARENA_MAX=1 monailabel start_server ... (see monailabel_app/README.md)"
    )
    return False


class ProxyPromptApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.config = ProxyPromptConfig(app_dir, studies, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ppgseg",
            description="Few-shot segmentation prompted by a support set (Proxy Prompt Generator on a frozen SAM)",
            version=ppgseg.__version__,
            labels=dict(self.config.labels),
        )

    def init_datastore(self):
        """MONAI Label's local datastore with checked ids, tags and labels (`lib/datastore.py`)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SafeDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            labels=self.config.labels,
            on_new_image=lambda image_id, path: self.config.service().prefetch(Study(image_id, Path(path))),
        )

    def init_infers(self) -> dict:
        return {
            "proxy_prompt": StudySupportInfer(self.config, self.datastore),
            "proxy_prompt_slices": SliceSupportInfer(self.config, self.datastore),
        }

    def init_trainers(self) -> dict:
        return {"proxy_prompt": ProxyPromptTrain(self.config, self.datastore)}

    def init_strategies(self) -> dict:
        return {"least_confident": LeastConfident(self.config, self.datastore)}

    def infer(self, request, datastore=None):
        """Name an unknown image id (HTTP 404) instead of failing on an empty path."""
        image = request.get("image")
        ds = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image):
            if image not in ds.list_images():
                raise HTTPException(status_code=404, detail=f"image {image!r} is not a study of this datastore")
            request = {**request, "image_id": image}
        return super().infer(request, datastore)

    def on_init_complete(self) -> None:
        from lib import routes
        from monailabel.app import app as server  # the running server (this runs inside its start-up)

        check_bind_address(bind_address(sys.argv), settings.MONAI_LABEL_AUTH_ENABLE)
        check_malloc_arenas(dict(os.environ))
        routes.install(server)
        super().on_init_complete()
