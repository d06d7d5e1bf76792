"""botocore's ``ec2`` service model, loaded once, and the EC2 protocol's naming rules over it.

The request parser (:mod:`api.ec2.query`) and the response serializer (:mod:`api.ec2.xml`) are
both driven by this model rather than by hand-written per-action tables, so the wire names always
match what botocore (and therefore boto3 and the AWS CLI) sends and parses.
"""

from __future__ import annotations

from functools import cache

import botocore.session
from botocore.model import OperationModel, ServiceModel, Shape, StructureShape

API_VERSION = "2016-11-15"
#: responses carry the namespace with a trailing slash, as AWS sends it
XML_NAMESPACE = f"http://ec2.amazonaws.com/doc/{API_VERSION}/"


@cache
def service_model() -> ServiceModel:
    """The botocore ``ec2`` service model (loaded from botocore's data files once per process)."""
    return botocore.session.get_session().get_service_model("ec2", api_version=API_VERSION)


@cache
def operation(action: str) -> OperationModel:
    """The operation model for ``action``; ``KeyError`` when the model has no such operation."""
    model = service_model()
    if action not in model.operation_names:
        raise KeyError(action)
    return model.operation_model(action)


def request_name(member_name: str, shape: Shape) -> str:
    """Wire name of a request member, by botocore's ``EC2Serializer`` rule.

    ``queryName`` if the member has one, else its ``locationName`` with the first letter
    capitalised, else the member name itself.
    """
    serialization = shape.serialization
    if "queryName" in serialization:
        return serialization["queryName"]
    name = serialization.get("name")
    if name:
        return name[0].upper() + name[1:]
    return member_name


def response_name(member_name: str, shape: Shape) -> str:
    """XML element name of a response member: its ``locationName``, else the member name
    (what botocore's ``EC2QueryParser`` looks for)."""
    return shape.serialization.get("name", member_name)


@cache
def request_members(shape: StructureShape) -> dict[str, tuple[str, Shape]]:
    """``{wire name: (member name, member shape)}`` for a request structure shape."""
    return {request_name(name, member): (name, member) for name, member in shape.members.items()}
