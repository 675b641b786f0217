"""`skinlesion serve`: a small HTTP endpoint for a serving SavedModel (serving.py), speaking
the KServe v1 / TF Serving REST predict protocol, for local use and smoke tests.

    POST /v1/models/<name>:predict          (also …/versions/<n>:predict)
      {"instances": [{"b64": "<base64 JPEG/PNG>"}, …]}
      {"instances": [{"image_bytes": {"b64": …}}, …]}      (named input, as TF Serving)
      {"inputs": {"image_bytes": [{"b64": …}, …]}}         (columnar; also "inputs": [ … ])
      -> {"predictions": [{"probabilities": [7 floats], "classes": [7 names],
                           "predicted": "nv"}, …]}            (columnar: {"outputs": {…}})
    GET  /v1/models/<name>            status (KServe `ready` and TF Serving's version status)
    GET  /v1/models/<name>/metadata   the signature

Bad input is a 400 with {"error": "…"} naming the instance; a body over MAX_BODY is a 413.
The model is what TF Serving would load: the same SavedModel, its graph doing the decode.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from skinlesion import logs
from skinlesion.errors import InputError
from skinlesion.layout import models_uri, serving_key
from skinlesion.manifest import MANIFEST
from skinlesion.scratch import scratch_dir
from skinlesion.serving import INPUT, OUTPUTS, SAVED_MODEL_FILE, SIGNATURE
from skinlesion.storage import download_prefix, open_store

MAX_BODY = 64 * 2**20  # bytes of JSON per request
MAX_INSTANCES = 64  # images per request
DEFAULT_NAME = "skinlesion"


class BadRequest(Exception):
    """A client error: answered with 400 and this message."""


@dataclass
class LoadedModel:
    name: str
    version: int | None
    source: str  # where it was loaded from, for the status and the log
    signature: Any  # the `serving_default` concrete function

    def predict(self, images: list[bytes]) -> dict[str, list[Any]]:
        """The signature's outputs as lists; BadRequest naming the first bad instance."""
        import tensorflow as tf

        try:
            out = self.signature(**{INPUT: tf.constant(images, dtype=tf.string)})
        except tf.errors.InvalidArgumentError as exc:
            if len(images) > 1:  # find the culprit: an answer about one instance
                for i, image in enumerate(images):
                    try:
                        self.signature(**{INPUT: tf.constant([image], dtype=tf.string)})
                    except tf.errors.InvalidArgumentError as one:
                        raise BadRequest(f"instance {i}: {graph_error(one)}") from None
            raise BadRequest(f"instance 0: {graph_error(exc)}") from None
        return {
            "probabilities": out["probabilities"].numpy().astype(float).tolist(),
            "classes": [[c.decode() for c in row] for row in out["classes"].numpy()],
            "predicted": [c.decode() for c in out["predicted"].numpy()],
        }


def graph_error(exc: Exception) -> str:
    """The message of an error raised inside the serving graph, without TF's node dump."""
    text = str(getattr(exc, "message", exc))
    if found := re.search(r"assertion failed: \[(.*?)\]", text):
        return found[1]
    lines = [ln.strip() for ln in text.splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("[[", "Graph execution", "File "))]
    useful = [ln for ln in useful if not ln.startswith("Detected at node")]
    return useful[-1] if useful else "the image cannot be decoded"


def load_model(path: Path, name: str, version: int | None, source: str) -> LoadedModel:
    """The SavedModel in the local directory `path`."""
    import tensorflow as tf

    if not (path / SAVED_MODEL_FILE).is_file():
        raise InputError(f"--model {source}: no {SAVED_MODEL_FILE} there")
    loaded = tf.saved_model.load(str(path))
    if SIGNATURE not in loaded.signatures:
        raise InputError(f"--model {source}: the SavedModel has no '{SIGNATURE}' signature")
    signature = loaded.signatures[SIGNATURE]
    if set(signature.structured_input_signature[1]) != {INPUT}:
        raise InputError(f"--model {source}: its '{SIGNATURE}' does not take '{INPUT}'")
    model = LoadedModel(name, version, source, signature)
    model._keep = loaded  # type: ignore[attr-defined]  # the signature needs its object alive
    return model


def open_model(uri: str, version: int | None = None, name: str = DEFAULT_NAME) -> LoadedModel:
    """The model `uri` names: a SavedModel directory or store prefix (one holding
    saved_model.pb, e.g. `<store>/models/serving/3`), else a store whose registry names
    the version: `version`, by default the `champion` alias's."""
    from skinlesion import registry

    local = Path(uri)
    if "://" not in uri and (local / SAVED_MODEL_FILE).is_file():
        if version is not None:
            raise InputError("--version: only with a store URI (not a SavedModel directory)")
        return load_model(local, name, _numeric(local.name), uri)
    store = open_store(uri)
    if store.exists(SAVED_MODEL_FILE):
        if version is not None:
            raise InputError("--version: only with a store URI (not a SavedModel prefix)")
        prefix, number = store, _numeric(uri.rstrip("/").rsplit("/", 1)[-1])
    else:
        models = open_store(models_uri(uri))
        _, reg = registry.read_raw(models)
        number = version if version is not None else reg["aliases"].get(registry.CHAMPION_ALIAS)
        if number is None:
            raise InputError(f"--model {uri}: no {SAVED_MODEL_FILE} there and no champion model")
        registry.entry(reg, number)  # a one-line error for an unknown version
        prefix = models.child(serving_key(number))
        if not prefix.exists(MANIFEST) or not prefix.exists(SAVED_MODEL_FILE):
            raise InputError(
                f"--model {uri}: version {number} has no committed serving export "
                f"({prefix.uri}): registered with promote.serving_export=false or before "
                "serving exports existed"
            )
    with scratch_dir("skinlesion-serve-") as work:  # variables are read into memory
        download_prefix(prefix, "", work)
        return load_model(work, name, number, prefix.uri)


def _numeric(segment: str) -> int | None:
    return int(segment) if segment.isdigit() else None


# --- the protocol -------------------------------------------------------------------------


def _image(value: Any, where: str) -> bytes:
    if isinstance(value, dict) and set(value) == {INPUT}:
        value = value[INPUT]
    if not isinstance(value, dict) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise BadRequest(f'{where}: expected {{"b64": "<base64 image bytes>"}}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: 'b64' is not valid base64") from None


def parse_request(body: bytes) -> tuple[list[bytes], bool]:
    """(images, columnar?) of a predict request body."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(request, dict) or len(set(request) & {"instances", "inputs"}) != 1:
        raise BadRequest('the body must be an object with "instances" (or "inputs")')
    columnar = "inputs" in request
    items = request["inputs"] if columnar else request["instances"]
    if columnar and isinstance(items, dict):
        if set(items) != {INPUT}:
            raise BadRequest(f'"inputs" must name the one input "{INPUT}"')
        items = items[INPUT]
    if not isinstance(items, list) or not items:
        raise BadRequest("no instances: send a non-empty list")
    if len(items) > MAX_INSTANCES:
        raise BadRequest(f"{len(items)} instances: at most {MAX_INSTANCES} per request")
    return [_image(item, f"instance {i}") for i, item in enumerate(items)], columnar


def predict_response(model: LoadedModel, body: bytes) -> dict[str, Any]:
    images, columnar = parse_request(body)
    outputs = model.predict(images)
    if columnar:
        return {"outputs": outputs}
    return {"predictions": [{k: outputs[k][i] for k in OUTPUTS} for i in range(len(images))]}


def status(model: LoadedModel) -> dict[str, Any]:
    version = str(model.version) if model.version is not None else "0"
    return {
        "name": model.name,
        "ready": True,
        "model_version_status": [
            {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK"}}
        ],
    }


def metadata(model: LoadedModel) -> dict[str, Any]:
    """The signature, as TF Serving's `/metadata` describes it."""
    from tensorflow.core.framework import types_pb2

    outputs = model.signature.structured_outputs
    return {
        "model_spec": {"name": model.name, "version": str(model.version or 0)},
        "metadata": {
            "signature_def": {
                SIGNATURE: {
                    "inputs": {INPUT: {"dtype": "DT_STRING", "shape": [-1]}},
                    "outputs": {
                        k: {
                            "dtype": types_pb2.DataType.Name(v.dtype.as_datatype_enum),
                            "shape": [-1 if d is None else d for d in v.shape.as_list()],
                        }
                        for k, v in outputs.items()
                    },
                }
            }
        },
    }


def _handler(model: LoadedModel) -> type[BaseHTTPRequestHandler]:
    base = f"/v1/models/{model.name}"
    predict_path = re.compile(rf"{re.escape(base)}(/versions/\d+)?:predict")

    class Handler(BaseHTTPRequestHandler):
        server_version = "skinlesion-serve"
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in (base, f"{base}/versions/{model.version}"):
                self._send(200, status(model))
            elif path == f"{base}/metadata":
                self._send(200, metadata(model))
            elif path in ("/v1/models", "/v2/health/ready", "/healthz"):
                self._send(200, {"models": [model.name], "ready": True})
            else:
                self._send(404, {"error": f"no such path {path!r}; the model is {base}"})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if not predict_path.fullmatch(path):
                self._send(404, {"error": f"no such path {path!r}; POST {base}:predict"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "a Content-Length header is required"})
                return
            if length > MAX_BODY:
                self.close_connection = True
                self._send(413, {"error": f"body of {length} bytes is over {MAX_BODY}"})
                return
            body = self.rfile.read(length)
            try:
                self._send(200, predict_response(model, body))
            except BadRequest as exc:
                self._send(400, {"error": str(exc)})

        def log_message(self, format: str, *args: Any) -> None:
            logs.get().info("http", client=self.client_address[0], request=format % args)

    return Handler


class Server:
    """The HTTP server on (host, port); port 0 picks a free one (see `address`)."""

    def __init__(self, model: LoadedModel, host: str, port: int) -> None:
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(model))
        except OSError as exc:
            raise InputError(f"--port {port}: cannot listen on {host}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.model = model

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        host, port = self.address
        logs.get().info(
            "serving",
            url=f"http://{host}:{port}/v1/models/{self.model.name}",
            model=self.model.source,
            version=self.model.version,
        )
        self.httpd.serve_forever()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
