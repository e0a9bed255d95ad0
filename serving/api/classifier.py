"""network3.v1.DigitClassifier: protos in, numpy arrays to the batcher, protos out."""
from __future__ import annotations

import asyncio

import numpy as np

from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

from .. import preprocess
from ..contract import CLASSES, PIXELS, SIDE
from ..errors import InvalidInput, Network3Error, Overloaded, grpc_status
from ..model import top_k
from .common import Servicer, deadline_of, now, pipelined, rpc

API = "network3.v1.DigitClassifier"


def _images(servicer, request) -> int:
    return len(request.images)


class ClassifierServicer(Servicer, pb_grpc.DigitClassifierServicer):
    API = API

    # -- Classify -------------------------------------------------------------------------

    @rpc(pb.ClassifyRequest, images=_images, model_call=True)
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        k = self._top_k(request)
        x, _, errors = await self._inputs(request.images, strict=True)
        logits, probs, model = await self.serving.batcher.infer(x, deadline_of(context))
        return pb.ClassifyResponse(predictions=_predictions(request.images, probs, model.unsure(x, probs),
                                                            model.labels, k),
                                   model_sha256=model.sha256)

    # -- ClassifyStream: one response per request, in order; bad images do not end it -----

    @rpc(pb.ClassifyRequest, images=_images)
    async def ClassifyStream(self, request_iterator, context):
        deadline = deadline_of(context)
        stats = self.serving.stats

        async def one(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            t0 = now()
            try:
                response = await self._stream_one(request, deadline)
                ok = True
            except Network3Error as e:
                response, ok = pb.ClassifyResponse(error=_error(e)), False
            stats.record_model_request(ok, now() - t0)
            return response

        async for response in pipelined(request_iterator, one):
            yield response

    async def _stream_one(self, request: pb.ClassifyRequest, deadline) -> pb.ClassifyResponse:
        k = self._top_k(request)
        x, good, errors = await self._inputs(request.images, strict=False)
        model = self.serving.model
        probs = np.empty((0, CLASSES), np.float32)
        if len(x):
            _, probs, model = await self.serving.batcher.infer(x, deadline)
        unsure = model.unsure(x, probs)
        images = request.images
        if not errors:
            predictions = _predictions(images, probs, unsure, model.labels, k)
        else:  # put the good images' answers back between the error entries
            ok = _predictions([images[i] for i in good], probs, unsure, model.labels, k)
            answers = dict(zip(good, ok))
            predictions = [answers.get(i) or pb.Prediction(id=images[i].id, error=_error(errors[i]))
                           for i in range(len(images))]
        return pb.ClassifyResponse(predictions=predictions, model_sha256=model.sha256)

    # -- GetModelInfo ---------------------------------------------------------------------

    @rpc(pb.GetModelInfoRequest)
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        s = self.serving
        model, limits, o = s.model, s.limits, s.batcher.options
        info = pb.ModelInfo(
            name=s.model_name, version=s.model_version, metadata=model.metadata,
            sha256=model.sha256, labels=model.labels, providers=model.providers, path=str(model.path),
            limits=pb.Limits(max_batch_size=o.max_batch_size, max_images_per_request=limits.max_images_per_request,
                             max_message_bytes=limits.max_message_bytes, max_pixels=limits.max_pixels),
        )
        info.loaded_at.FromNanoseconds(int(model.loaded_at * 1e9))
        return info

    # -- conversions ----------------------------------------------------------------------

    def _top_k(self, request) -> int:
        if not request.HasField("top_k"):
            return 0
        k = request.top_k
        if k > CLASSES:
            raise InvalidInput(f"top_k: {k} is more than the {CLASSES} digits")
        return k

    async def _inputs(self, images, strict: bool):
        """images -> (float32 [M, 1, 28, 28] of the good ones, their indices, {index: error}).

        strict: the first bad image raises InvalidInput naming its index (unary Classify)."""
        n = len(images)
        if n == 0:
            raise InvalidInput("images: the request has no images")
        limit = self.serving.limits.max_images_per_request
        if n > limit:
            raise Overloaded(f"images: {n} images in one request, over --max-images-per-request {limit}")
        raw = [im.pixels for im in images]
        if all(len(r) == PIXELS for r in raw):  # the bulk fast path: all pixels, no decoding, one join
            return preprocess.pixels_to_input(np.frombuffer(b"".join(raw), np.uint8).reshape(n, SIDE, SIDE)), None, {}
        items = [_item(i, im) for i, im in enumerate(images)]
        if strict:  # refuse before decoding anything when an image is already known bad
            bad = next((item for item in items if isinstance(item, Exception)), None)
            if bad is not None:
                raise bad
        if any(isinstance(item, bytes) for item in items):
            pixels, failures = await asyncio.get_running_loop().run_in_executor(
                self.serving.decode_pool, preprocess.decode_many, items, self.serving.limits.max_pixels)
        else:
            pixels, failures = preprocess.decode_many(items, self.serving.limits.max_pixels)
        errors: dict[int, Exception] = {}
        for i, e in enumerate(failures):
            if e is not None:
                errors[i] = type(e)(f"images[{i}].encoded: {e}") if isinstance(items[i], bytes) else e
                if strict:
                    raise errors[i]
        if errors:
            good = [i for i in range(n) if i not in errors]
            return preprocess.pixels_to_input(pixels[good]), good, errors
        return preprocess.pixels_to_input(pixels), None, errors


def _item(i: int, image: pb.Image):
    """One Image as an item of preprocess.decode_many: encoded bytes, pixels, or its error."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded
    if kind == "pixels":
        if len(image.pixels) != PIXELS:
            return InvalidInput(f"images[{i}].pixels: {len(image.pixels)} bytes, expected {PIXELS} ({SIDE}x{SIDE} uint8)")
        return np.frombuffer(image.pixels, np.uint8)
    return InvalidInput(f"images[{i}]: neither `encoded` nor `pixels` is set")


def _error(e: Exception) -> pb.Error:
    status, message = grpc_status(e)
    return pb.Error(code=status.value[0], message=message)


def _predictions(images, probs: np.ndarray, unsure: np.ndarray, labels: list[str], k: int) -> list[pb.Prediction]:
    """One Prediction per row.  The numbers are computed for all rows at once."""
    if not len(probs):
        return []
    digits = probs.argmax(1)
    best = probs[np.arange(len(probs)), digits].tolist()
    rows = probs.tolist()
    digits = digits.tolist()
    unsure = unsure.tolist()
    P = pb.Prediction
    if not k:
        return [P(id=im.id, digit=d, probability=p, probabilities=row, label=labels[d], unsure=u)
                for im, d, p, row, u in zip(images, digits, best, rows, unsure)]
    order, top_p = top_k(probs, k)
    C = pb.Class
    return [P(id=im.id, digit=d, probability=p, probabilities=row, label=labels[d], unsure=u,
              top_k=[C(digit=j, probability=q, label=labels[j]) for j, q in zip(o, qs)])
            for im, d, p, row, u, o, qs in zip(images, digits, best, rows, unsure, order.tolist(), top_p.tolist())]
