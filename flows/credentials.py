"""Credentials from a Prefect block (prefect-aws's AwsCredentials), turned into s3fs options.

Only the block's name travels in flow parameters; the secret is read inside the run and handed
to the filesystem, never to a config, a log line, a manifest or an error message.
"""

from __future__ import annotations


def s3_options_from_block(name: str) -> dict[str, dict]:
    """Storage options for s3:// URLs from the AwsCredentials block `name`."""
    from prefect_aws import AwsCredentials

    import httpx  # Prefect's HTTP client
    from prefect.settings import get_current_settings

    from ae_core.errors import AeError

    try:
        creds = AwsCredentials.load(name)
    except ValueError as err:
        raise AeError(f"no AwsCredentials block named {name!r}; create it (prefect block register "
                      "-m prefect_aws, then in the UI or with AwsCredentials(...).save(name))") from err
    except (httpx.TransportError, RuntimeError) as err:  # the block lives on a Prefect server that is down
        if isinstance(err, RuntimeError) and not str(err).startswith("Failed to reach API"):
            raise
        raise AeError(f"cannot load the AwsCredentials block {name!r}: the Prefect server at "
                      f"{get_current_settings().api.url} does not answer ({type(err).__name__}); start it, or unset "
                      "PREFECT_API_URL (in the environment or your Prefect profile) to read blocks from the local "
                      "Prefect database under PREFECT_HOME", transient=True) from err
    options: dict = {}
    if creds.aws_access_key_id:
        options["key"] = creds.aws_access_key_id
    if creds.aws_secret_access_key:
        options["secret"] = creds.aws_secret_access_key.get_secret_value()
    if creds.aws_session_token:
        options["token"] = creds.aws_session_token
    if creds.profile_name:
        options["profile"] = creds.profile_name
    client = {"region_name": creds.region_name} if creds.region_name else {}
    endpoint = creds.aws_client_parameters.endpoint_url if creds.aws_client_parameters else None
    if endpoint:
        client["endpoint_url"] = endpoint
    if client:
        options["client_kwargs"] = client
    return {"s3": options, "s3a": options}
