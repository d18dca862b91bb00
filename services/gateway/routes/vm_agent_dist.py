"""`GET /api/vm-agent/dist/{version}.tar.gz`: a cloud workspace fetches the vm_agent it runs.

Only with a workspace's dist credential (`Authorization: Bearer …`, issued in its user_data, valid
until it expires), and only the version this control plane runs: a VM runs exactly our code.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Header, HTTPException, Request, Response

from services.provisioner.cloud_init import check_dist_credential, pinned_artifact

router = APIRouter(prefix="/api/vm-agent", tags=["vm-agent"])
log = logging.getLogger(__name__)


@router.get("/dist/{version}.tar.gz")
def vm_agent_dist(version: str, request: Request, authorization: str | None = Header(default=None)) -> Response:
    """The vm_agent artifact (gzipped tar). 401: no, a forged or an expired credential; 404: a
    version other than the one running here."""
    settings = request.app.state.gateway.settings
    secret = settings.install_secret()
    scheme, _, credential = (authorization or "").partition(" ")
    workspace_id = check_dist_credential(secret, credential) if scheme.lower() == "bearer" else None
    if workspace_id is None:
        raise HTTPException(401, "a workspace's dist credential is required (it may have expired)")
    artifact = pinned_artifact(settings.data_dir)
    if version != artifact.version:
        raise HTTPException(404, f"this control plane runs vm_agent {artifact.version}, not {version}")
    log.info("vm_agent %s fetched by workspace %s", version, workspace_id)
    return Response(artifact.data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="vm_agent-{version}.tar.gz"'})
