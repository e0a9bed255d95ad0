"""network3.v1.DigitClassifier: protos in, numpy arrays to the batcher, protos out."""
from __future__ import annotations

import asyncio

import numpy as np

from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

from .. import preprocess
from ..errors import InvalidInput, Network3Error, Overloaded, grpc_status
from .common import Serving, deadline_of, now, parser, pipelined, stream, unary

API = "network3.v1.DigitClassifier"
PIXELS = preprocess.PIXELS


class ClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, serving: Serving) -> None:
        self.s = serving
        request = parser(pb.ClassifyRequest)
        self.Classify = unary(serving, API, "Classify", self._classify, _count, model_call=True, parse=request)
        self.ClassifyStream = stream(serving, API, "ClassifyStream", self._classify_stream, parse=request)
        self.GetModelInfo = unary(serving, API, "GetModelInfo", self._model_info, lambda r: 0,
                                  parse=parser(pb.GetModelInfoRequest))

    # -- Classify -------------------------------------------------------------------------

    async def _classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        top_k = self._top_k(request)
        x, _, errors = await self._inputs(request.images, strict=True)
        logits, probs, model = await self.s.batcher.infer(x, deadline_of(context))
        return pb.ClassifyResponse(predictions=_predictions(request.images, probs, model.labels, top_k),
                                   model_sha256=model.sha256)

    # -- ClassifyStream: one response per request, in order; bad images do not end it -----

    async def _classify_stream(self, request_iterator, context, tally):
        deadline = deadline_of(context)

        async def one(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            tally[0] += 1
            tally[1] += len(request.images)
            t0 = now()
            try:
                response = await self._stream_one(request, deadline)
                ok = True
            except Network3Error as e:
                response, ok = pb.ClassifyResponse(error=_error(e)), False
            self.s.stats.record_model_request(ok, now() - t0)
            return response

        async for response in pipelined(request_iterator, one):
            yield response

    async def _stream_one(self, request: pb.ClassifyRequest, deadline) -> pb.ClassifyResponse:
        top_k = self._top_k(request)
        x, good, errors = await self._inputs(request.images, strict=False)
        model = self.s.model
        probs = np.empty((0, 10), np.float32)
        if len(x):
            _, probs, model = await self.s.batcher.infer(x, deadline)
        images = request.images
        if not errors:
            predictions = _predictions(images, probs, model.labels, top_k)
        else:  # put the good images' answers back between the error entries
            ok = _predictions([images[i] for i in good], probs, model.labels, top_k)
            answers = dict(zip(good, ok))
            predictions = [answers.get(i) or pb.Prediction(id=images[i].id, error=_error(errors[i]))
                           for i in range(len(images))]
        return pb.ClassifyResponse(predictions=predictions, model_sha256=model.sha256)

    # -- GetModelInfo ---------------------------------------------------------------------

    async def _model_info(self, request, context) -> pb.ModelInfo:
        model, limits, o = self.s.model, self.s.limits, self.s.batcher.options
        info = pb.ModelInfo(
            name=self.s.model_name, version=self.s.model_version, metadata=model.metadata,
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
        if k > 10:
            raise InvalidInput(f"top_k: {k} is more than the 10 digits")
        return k

    async def _inputs(self, images, strict: bool):
        """images -> (float32 [M, 1, 28, 28] of the good ones, their indices, {index: error}).

        strict: the first bad image raises InvalidInput naming its index (unary Classify)."""
        n = len(images)
        if n == 0:
            raise InvalidInput("images: the request has no images")
        limit = self.s.limits.max_images_per_request
        if n > limit:
            raise Overloaded(f"images: {n} images in one request, over --max-images-per-request {limit}")
        kinds = [im.WhichOneof("data") for im in images]
        errors: dict[int, Exception] = {}
        if all(k == "pixels" for k in kinds):  # the bulk fast path: no decoding, one join
            raw = [im.pixels for im in images]
            if any(len(r) != PIXELS for r in raw):
                for i, r in enumerate(raw):
                    if len(r) != PIXELS:
                        errors[i] = InvalidInput(f"images[{i}].pixels: {len(r)} bytes, expected {PIXELS} (28x28 uint8)")
                        if strict:
                            raise errors[i]
                raw = [r if len(r) == PIXELS else bytes(PIXELS) for r in raw]
            pixels = np.frombuffer(b"".join(raw), np.uint8).reshape(n, 28, 28)
        else:
            pixels = np.zeros((n, 28, 28), np.uint8)
            encoded = []
            for i, (im, kind) in enumerate(zip(images, kinds)):
                if kind == "pixels":
                    if len(im.pixels) != PIXELS:
                        errors[i] = InvalidInput(f"images[{i}].pixels: {len(im.pixels)} bytes, expected {PIXELS} (28x28 uint8)")
                    else:
                        pixels[i] = np.frombuffer(im.pixels, np.uint8).reshape(28, 28)
                elif kind == "encoded":
                    encoded.append(i)
                else:
                    errors[i] = InvalidInput(f"images[{i}]: neither `encoded` nor `pixels` is set")
                if strict and errors:
                    raise errors[i]
            if encoded:
                decoded, failures = await asyncio.get_running_loop().run_in_executor(
                    self.s.decode_pool, preprocess.decode_many, [images[i].encoded for i in encoded],
                    self.s.limits.max_pixels)
                pixels[encoded] = decoded
                for i, e in zip(encoded, failures):
                    if e is not None:
                        errors[i] = type(e)(f"images[{i}].encoded: {e}")
                        if strict:
                            raise errors[i]
        if errors:
            good = [i for i in range(n) if i not in errors]
            return preprocess.pixels_to_input(pixels[good]), good, errors
        return preprocess.pixels_to_input(pixels), None, errors


def _count(request) -> int:
    return len(request.images)


def _error(e: Exception) -> pb.Error:
    status, message = grpc_status(e)
    return pb.Error(code=status.value[0], message=message)


def _predictions(images, probs: np.ndarray, labels: list[str], top_k: int) -> list[pb.Prediction]:
    """One Prediction per row.  The numbers are computed for all rows at once."""
    if not len(probs):
        return []
    digits = probs.argmax(1)
    best = probs[np.arange(len(probs)), digits].tolist()
    rows = probs.tolist()
    digits = digits.tolist()
    P = pb.Prediction
    if not top_k:
        return [P(id=im.id, digit=d, probability=p, probabilities=row, label=labels[d])
                for im, d, p, row in zip(images, digits, best, rows)]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    top_p = np.take_along_axis(probs, order, 1).tolist()
    C = pb.Class
    return [P(id=im.id, digit=d, probability=p, probabilities=row, label=labels[d],
              top_k=[C(digit=j, probability=q, label=labels[j]) for j, q in zip(o, qs)])
            for im, d, p, row, o, qs in zip(images, digits, best, rows, order.tolist(), top_p)]
