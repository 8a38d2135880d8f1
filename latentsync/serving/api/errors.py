"""The API's errors: one JSON body shape, one map from error to HTTP status."""

from __future__ import annotations

from flask import jsonify


class ApiError(Exception):
    """An HTTP error with a JSON body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str):
    return jsonify({"error": {"code": code, "message": message}}), status
