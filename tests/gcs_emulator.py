"""`python tests/gcs_emulator.py start --host H --port P --in-memory`: the gcp-storage-emulator server, with
the object-generation headers of the real GCS API that it does not send.

Real GCS answers every media download with `x-goog-generation` and `x-goog-metageneration`. TensorStore's
GCS driver reads the generation from them before a conditional update; Orbax's OCDBT checkpoints update
their manifest that way (several times per save for a tree of many arrays). The emulator records the
generation in its object metadata (what its JSON API returns) but omits the headers, so TensorStore
fails with "Malformed StorageGeneration". This adds the two headers from that same metadata.
The server is single-threaded: a per-connection timeout keeps a connection that a killed client left
open from blocking it. Everything else is the installed package, unchanged.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 (not found: the emulator already answered 404)
        return
    response["x-goog-generation"] = str(obj.get("generation", "1"))
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation  # before the server module builds its routing table

from gcp_storage_emulator import server  # noqa: E402

server.RequestHandler.timeout = 60  # seconds a connection may stay silent

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
