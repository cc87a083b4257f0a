"""Start MLflow's tracking server behind its basic-auth app, with maeclip's identities (k8s/README.md,
"Identities"): an admin, and one MLflow user per kind of client with the grants in ``USERS``.

The container's entry point (k8s/base/mlflow.yaml), run with the MLflow image's Python. Passwords come from the
files of the Secret mounted at ``$MAECLIP_AUTH_SECRETS``; the user store is a sqlite file under
``$MAECLIP_AUTH_DIR`` (the pod's scratch volume), rebuilt from the Secret at every start. Rotating a password is
editing the Secret and restarting the server; a grant made by hand does not outlive the pod, so the Secret and
this file are the whole truth about who may do what. Arguments are passed on to ``mlflow server``.
"""

import os
import sys
from pathlib import Path

ADMIN = "admin"
# Every signed-in user reads everything (default_permission below); anonymous requests are refused.
# Training pods and pipeline steps log runs and metrics in any experiment, and may not touch the model registry:
# a DENY grant also stops them creating a registered model, which would make them its owner. The gate alone
# registers versions and moves the aliases (candidate, champion) that consumers load.
NO_REGISTRY = [("experiment", "*", "EDIT"), ("registered_model", "*", "DENY"), ("prompt", "*", "DENY")]
USERS = {
    # user: (file of the Secret with its password, grants as (resource type, pattern, permission))
    "maeclip-trainer": ("trainer-password", NO_REGISTRY),
    "maeclip-pipeline": ("pipeline-password", NO_REGISTRY),
    "maeclip-gate": ("gate-password", [("experiment", "*", "EDIT"), ("registered_model", "*", "MANAGE")]),
}


def main(argv: list[str]) -> None:
    secrets = Path(os.environ.get("MAECLIP_AUTH_SECRETS", "/run/secrets/mlflow-auth"))
    folder = Path(os.environ.get("MAECLIP_AUTH_DIR", "/tmp"))

    def secret(name: str) -> str:
        return (secrets / name).read_text().strip()

    database = folder / "mlflow-auth.db"
    database.unlink(missing_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{database}\n"
                      f"admin_username = {ADMIN}\n")
    # mlflow reads these from the environment only; the server process inherits them through exec.
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret("flask-secret-key")

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{database}")
    store.create_user(ADMIN, secret("admin-password"), is_admin=True)
    for user, (password, grants) in USERS.items():
        store.create_user(user, secret(password))
        for resource_type, pattern, permission in grants:
            store.grant_user_permission(user, resource_type, pattern, permission)
    os.execvp("mlflow", ["mlflow", "server", "--app-name", "basic-auth", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
