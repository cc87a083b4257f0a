"""Test-only: anonymous Google credentials for processes that talk to gcp-storage-emulator.

Streaming's GCS client asks ``google.auth.default()`` for credentials and no environment variable makes it
anonymous. The storage fixtures put this folder on PYTHONPATH and set ``MAECLIP_TEST_ANON_GCS=1``, so torchrun
workers and other subprocesses get the same patch as the test process. Nothing outside tests/ loads it.
"""

import os


def use_anonymous_google_credentials() -> None:
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    google.auth.default = lambda *args, **kwargs: (AnonymousCredentials(), "test-project")


if os.environ.get("MAECLIP_TEST_ANON_GCS") == "1":
    use_anonymous_google_credentials()
