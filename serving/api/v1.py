"""The /v1 HTTP API and the web page: /v1/classify, /v1/model, /v1/openapi.json, / and /web/*.

serving.api.http.build_app calls add_routes(app, serving) after its own routes; the handlers
raise domain errors (serving.errors) and rely on build_app's middlewares for auth, errors,
request ids, the access log and body limits.
"""


def add_routes(app, serving) -> None:
    pass
