"""Reader for B2MML V0401 messages: production schedules, performance and material data.

B2MML is MESA's XML form of ISA-95. A schedule releases orders, a performance message
reports what was consumed and produced, and a material lot or sub-lot whose status
blocks its use puts a hold on that lot. Material definitions and lots in good standing
are master data and yield no event. docs/inputs.md gives the full mapping.

Files are parsed with defusedxml, because they come from outside and XML entity tricks
could otherwise exhaust memory or read local files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

# Element and TreeBuilder only build the tree: parsing goes through defusedxml below.
from xml.etree.ElementTree import Element, ParseError, TreeBuilder  # noqa: S405

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser
from defusedxml.ElementTree import iterparse as defused_iterparse

from contracts.events import (
    Component,
    MaterialConsumed,
    OperationSpec,
    PlantEvent,
    ProductionConfirmed,
    QualityHoldApplied,
    Quantity,
    WorkOrderReleased,
)
from pipeline.subjects import validate_token

__all__ = [
    "BLOCKING_STATUSES",
    "DEFAULT_CYCLE_TIME_S",
    "MESSAGE_NOUNS",
    "NAMESPACE",
    "message_noun",
    "parse_timestamp",
    "read_b2mml",
]

logger = logging.getLogger(__name__)

SOURCE = "b2mml"

NAMESPACE = "http://www.wbf.org/xml/B2MML-V0401"

DATA_VERBS = ("Sync", "Process", "Show")
"""Verbs whose DataArea carries facts. Get, Cancel and Acknowledge carry none."""

MESSAGE_NOUNS = (
    "ProductionSchedule",
    "ProductionPerformance",
    "MaterialInformation",
    "MaterialDefinition",
)

DEFAULT_CYCLE_TIME_S = Decimal(60)
"""Ideal cycle time given to each schedule operation: B2MML schedules carry none."""

BLOCKING_STATUSES = frozenset(
    {"notvalid", "blocked", "rejected", "quarantine", "quarantined", "hold", "onhold"}
)
"""Lot and sub-lot statuses (compared without case) that block stock with a hold."""

USABLE_STATUSES = frozenset({"valid", "released", "available", "approved"})

_TIMESTAMP = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})"
)


def _tag(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_timestamp(text: str) -> dt.datetime:
    """Parse an xs:dateTime with a UTC offset into an aware UTC datetime.

    Fractions beyond microseconds (B2MML writers often send 7 digits) are truncated,
    since Python datetimes hold 6. A time without an offset raises ValueError instead of
    being guessed.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid dateTime {text!r}: expected yyyy-mm-ddThh:mm:ss[.fraction] with "
            "'Z' or a +hh:mm offset"
        )
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = "+00:00" if match["offset"] == "Z" else match["offset"]
    return dt.datetime.fromisoformat(f"{match['base']}.{fraction}{offset}").astimezone(
        dt.UTC
    )


def message_noun(path: Path) -> str | None:
    """Return the noun of a supported B2MML V0401 message in `path`, else None.

    Only the root element is read, so this is cheap enough to sort a folder with.
    """
    try:
        for _, element in defused_iterparse(str(path), events=("start",)):
            return _supported_noun(element.tag)
    except (ParseError, DefusedXmlException):
        return None
    return None


def _supported_noun(tag: str) -> str | None:
    if not tag.startswith(f"{{{NAMESPACE}}}"):
        return None
    name = _local(tag)
    for verb in DATA_VERBS:
        noun = name.removeprefix(verb)
        if noun != name and noun in MESSAGE_NOUNS:
            return noun
    return None


def read_b2mml(
    path: Path,
    *,
    plant: str = "B2MML",
    work_center: str = "B2MML-LINE",
    cycle_time_s: Decimal = DEFAULT_CYCLE_TIME_S,
) -> Iterator[PlantEvent]:
    """Read one B2MML V0401 message file into plant events.

    `work_center` is used for schedule operations that name no equipment, and
    `cycle_time_s` is their ideal cycle time. Raises ValueError naming the file, line
    and value when the message cannot be mapped.
    """
    validate_token(plant, "plant")
    message = _Message.parse(Path(path))
    reader = _Reader(
        message, plant=plant, work_center=work_center, cycle_time_s=cycle_time_s
    )
    if message.noun == "ProductionSchedule":
        return reader.schedule()
    if message.noun == "ProductionPerformance":
        return reader.performance()
    if message.noun == "MaterialInformation":
        return reader.material_information()
    logger.info(
        "%s: %s is master data (material properties), so it yields no plant event",
        message.path,
        _local(message.root.tag),
    )
    return iter(())


class _LineTreeBuilder(TreeBuilder):
    """Tree builder that records each element's source line, for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Element, int] = {}
        self.expat: object = None

    def start(self, tag: str, attrs: dict[str, str]) -> Element:
        element = super().start(tag, attrs)
        self.lines[element] = getattr(self.expat, "CurrentLineNumber", 0)
        return element


@dataclass(slots=True)
class _Message:
    path: Path
    root: Element
    noun: str
    digest: str
    lines: dict[Element, int] = field(repr=False)

    @classmethod
    def parse(cls, path: Path) -> _Message:
        data = path.read_bytes()
        builder = _LineTreeBuilder()
        parser = DefusedXMLParser(target=builder)
        # The pure-Python parser defusedxml builds on exposes its expat parser, whose
        # current line is the line of the start tag being handled.
        builder.expat = getattr(parser, "parser", None)
        try:
            parser.feed(data)
            root = parser.close()
        except ParseError as error:
            raise ValueError(f"{path}: invalid XML: {error}") from error
        except DefusedXmlException as error:
            raise ValueError(
                f"{path}: rejected unsafe XML ({error!r}). B2MML messages need no DTD "
                "or entity declarations, so remove them"
            ) from error

        noun = _supported_noun(root.tag)
        if noun is None:
            raise ValueError(
                f"{path}: root element {root.tag} is not a supported B2MML V0401 "
                f"message; expected {', '.join(DATA_VERBS)} with "
                f"{', '.join(MESSAGE_NOUNS)} in namespace {NAMESPACE}"
            )
        # Ids of events with no natural business key are built from this digest, so the
        # same bytes always give the same ids and any edited file gives new ones.
        digest = hashlib.blake2b(data, digest_size=6).hexdigest()
        return cls(path=path, root=root, noun=noun, digest=digest, lines=builder.lines)

    def where(self, element: Element) -> str:
        return f"{self.path}:{self.lines.get(element, 0)}"

    def text(self, parent: Element, name: str) -> str | None:
        child = parent.find(_tag(name))
        if child is None or child.text is None or not child.text.strip():
            return None
        return child.text.strip()

    def required_text(self, parent: Element, name: str) -> str:
        value = self.text(parent, name)
        if value is None:
            raise ValueError(
                f"{self.where(parent)}: {_local(parent.tag)} has no {name}, which "
                "plantstream needs to map it"
            )
        return value

    def timestamp(self, parent: Element, name: str) -> dt.datetime | None:
        text = self.text(parent, name)
        if text is None:
            return None
        child = parent.find(_tag(name))
        assert child is not None  # text() found it
        try:
            return parse_timestamp(text)
        except ValueError as error:
            raise ValueError(f"{self.where(child)}: {name}: {error}") from None

    def created_at(self) -> dt.datetime:
        area = self.root.find(_tag("ApplicationArea"))
        created = None if area is None else self.timestamp(area, "CreationDateTime")
        if created is None:
            raise ValueError(
                f"{self.path}: ApplicationArea has no CreationDateTime, which "
                "plantstream needs as the time of events the message does not time"
            )
        return created

    def quantity(self, parent: Element) -> Quantity:
        node = parent.find(_tag("Quantity"))
        if node is None:
            raise ValueError(
                f"{self.where(parent)}: {_local(parent.tag)} has no Quantity"
            )
        raw = self.required_text(node, "QuantityString")
        uom = self.required_text(node, "UnitOfMeasure")
        try:
            value = Decimal(raw)
        except InvalidOperation:
            string = node.find(_tag("QuantityString"))
            where = self.where(node if string is None else string)
            raise ValueError(
                f"{where}: invalid QuantityString {raw!r}: expected a decimal number "
                "such as 12.500"
            ) from None
        try:
            return Quantity(value, uom)
        except ValueError as error:
            raise ValueError(f"{self.where(node)}: {error}") from None


@dataclass(slots=True)
class _Reader:
    message: _Message
    plant: str
    work_center: str
    cycle_time_s: Decimal

    def schedule(self) -> Iterator[PlantEvent]:
        released_at = self.message.created_at()
        requests = list(self.message.root.iter(_tag("ProductionRequest")))
        # Build every release before yielding any, so a bad request fails the whole file
        # before anything is published.
        events = [self._release(request, released_at) for request in requests]
        logger.info("%s: %d production requests", self.message.path, len(events))
        return iter(events)

    def _release(self, request: Element, released_at: dt.datetime) -> WorkOrderReleased:
        message = self.message
        order = message.required_text(request, "ID")
        plan = _RequestPlan(message=message, work_center=self.work_center)
        plan.walk(request, operation=None)
        material, quantity = plan.output(request, order)
        return WorkOrderReleased(
            event_id=f"{self.plant}-order-{order}-released",
            plant=self.plant,
            occurred_at=released_at,
            source=SOURCE,
            order=order,
            material=material,
            quantity=quantity,
            components=plan.components,
            operations=[
                OperationSpec(
                    operation=operation,
                    work_center=work_center,
                    ideal_cycle_time_s=self.cycle_time_s,
                )
                for operation, work_center in plan.operations.items()
            ],
        )

    def performance(self) -> Iterator[PlantEvent]:
        created_at = self.message.created_at()
        events: list[PlantEvent] = []
        for response in self.message.root.iter(_tag("ProductionResponse")):
            # ProductionRequestID names the order this response reports on. Without it
            # the response's own ID is used, never matched against known schedules.
            order = self.message.text(response, "ProductionRequestID")
            if order is None:
                order = self.message.required_text(response, "ID")
            self._segment_responses(response, order, created_at, None, events)
        logger.info("%s: %d material actuals", self.message.path, len(events))
        return iter(events)

    def _segment_responses(
        self,
        parent: Element,
        order: str,
        default_time: dt.datetime,
        operation: str | None,
        events: list[PlantEvent],
    ) -> None:
        message = self.message
        for segment in parent.findall(_tag("SegmentResponse")):
            segment_operation = (
                message.text(segment, "ProcessSegmentID")
                or message.text(segment, "ID")
                or operation
            )
            started_at = message.timestamp(segment, "ActualStartTime")
            ended_at = message.timestamp(segment, "ActualEndTime") or default_time
            for actual in segment.findall(_tag("MaterialActual")):
                event = self._actual(
                    actual,
                    order,
                    segment_operation,
                    started_at,
                    ended_at,
                    len(events) + 1,
                )
                if event is not None:
                    events.append(event)
            self._segment_responses(segment, order, ended_at, segment_operation, events)

    def _actual(
        self,
        actual: Element,
        order: str,
        operation: str | None,
        started_at: dt.datetime | None,
        occurred_at: dt.datetime,
        number: int,
    ) -> PlantEvent | None:
        message = self.message
        use = _material_use(message.text(actual, "MaterialUse"))
        material = message.required_text(actual, "MaterialDefinitionID")
        if use not in ("Consumed", "Produced"):
            logger.info(
                "%s: MaterialActual %s has MaterialUse %r, neither Consumed nor "
                "Produced, so it moves no stock and yields no event",
                message.where(actual),
                material,
                use,
            )
            return None
        quantity = message.quantity(actual)
        lot = message.text(actual, "MaterialLotID")
        prefix = f"{self.plant}-{message.digest}-{number:03d}"
        if use == "Consumed":
            return MaterialConsumed(
                event_id=f"{prefix}-consumed",
                plant=self.plant,
                occurred_at=occurred_at,
                source=SOURCE,
                order=order,
                material=material,
                quantity=quantity,
                lot=lot,
                operation=operation,
            )
        return ProductionConfirmed(
            event_id=f"{prefix}-confirmed",
            plant=self.plant,
            occurred_at=occurred_at,
            source=SOURCE,
            order=order,
            good=quantity,
            lot=lot,
            operation=operation,
            started_at=started_at,
        )

    def material_information(self) -> Iterator[PlantEvent]:
        message = self.message
        created_at = message.created_at()
        events: list[PlantEvent] = []
        for information in message.root.iter(_tag("MaterialInformation")):
            for lot in information.iter(_tag("MaterialLot")):
                lot_id = message.required_text(lot, "ID")
                # The lot names its material where the sender fills it in. The example
                # vendor puts the material in the MaterialInformation ID instead.
                material = message.text(lot, "MaterialDefinitionID") or message.text(
                    information, "ID"
                )
                for element in (lot, *lot.iter(_tag("MaterialSubLot"))):
                    hold = self._status_hold(
                        element, lot_id, material, created_at, len(events) + 1
                    )
                    if hold is not None:
                        events.append(hold)
        return iter(events)

    def _status_hold(
        self,
        element: Element,
        lot: str,
        material: str | None,
        occurred_at: dt.datetime,
        number: int,
    ) -> QualityHoldApplied | None:
        message = self.message
        kind = (
            "material lot" if element.tag == _tag("MaterialLot") else "material sub-lot"
        )
        name = message.required_text(element, "ID")
        status = message.text(element, "Status")
        if status is None or status.lower() in USABLE_STATUSES:
            logger.info(
                "%s: %s %s has status %s: lot master data, no plant event",
                message.where(element),
                kind,
                name,
                status or "(none)",
            )
            return None
        if status.lower() not in BLOCKING_STATUSES:
            logger.warning(
                "%s: %s %s has status %r, which is neither usable (%s) nor "
                "blocking (%s), so no hold is placed",
                message.where(element),
                kind,
                name,
                status,
                ", ".join(sorted(USABLE_STATUSES)),
                ", ".join(sorted(BLOCKING_STATUSES)),
            )
            return None
        hold_id = f"{self.plant}-{message.digest}-{number:03d}"
        # NOTE: a lot-scoped hold names a lot, not a sub-lot, so a blocked sub-lot holds
        # its whole lot. That blocks more than the sub-lot, the safe side for quality.
        return QualityHoldApplied(
            event_id=f"{hold_id}-hold-applied",
            plant=self.plant,
            occurred_at=occurred_at,
            source=SOURCE,
            hold_id=hold_id,
            scope="lot",
            lot=lot,
            material=material,
            reason=f"{kind} {name} status {status}",
        )


@dataclass(slots=True)
class _RequestPlan:
    """Output, components and operations collected from one ProductionRequest."""

    message: _Message
    work_center: str
    produced: list[tuple[Element, str, Quantity]] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    operations: dict[str, str] = field(default_factory=dict)

    def walk(self, parent: Element, operation: str | None) -> None:
        message = self.message
        for child in parent:
            if child.tag == _tag("MaterialRequirement"):
                self._requirement(child, operation)
            elif child.tag == _tag("SegmentRequirement"):
                segment = message.text(child, "ProcessSegmentID")
                if segment is not None and segment not in self.operations:
                    self.operations[segment] = (
                        self._equipment(child) or self.work_center
                    )
                self.walk(child, segment or operation)

    def _equipment(self, segment: Element) -> str | None:
        requirement = segment.find(_tag("EquipmentRequirement"))
        if requirement is None:
            return None
        return self.message.text(requirement, "EquipmentID")

    def _requirement(self, requirement: Element, operation: str | None) -> None:
        message = self.message
        material = message.required_text(requirement, "MaterialDefinitionID")
        use = _material_use(message.text(requirement, "MaterialUse"))
        if use == "Produced":
            self.produced.append((requirement, material, message.quantity(requirement)))
        elif use == "Consumed":
            # Lines of the same material stay separate: each is its own BOM item.
            self.components.append(
                Component(
                    material=material,
                    quantity=message.quantity(requirement),
                    operation=operation,
                )
            )
        else:
            # Requirements without a use name the lots or containers to draw from, not
            # extra quantities, so counting them would double the standard consumption.
            logger.info(
                "%s: MaterialRequirement %s has MaterialUse %r, not a BOM line",
                message.where(requirement),
                material,
                use,
            )

    def output(self, request: Element, order: str) -> tuple[str, Quantity]:
        message = self.message
        if not self.produced:
            raise ValueError(
                f"{message.where(request)}: ProductionRequest {order} has no "
                "MaterialRequirement with MaterialUse Produced; an order needs the "
                "material it makes"
            )
        first_element, material, quantity = self.produced[0]
        total = quantity.value
        for element, other_material, other in self.produced[1:]:
            if other_material != material or other.uom != quantity.uom:
                raise ValueError(
                    f"{message.where(element)}: ProductionRequest {order} produces "
                    f"{other_material} in {other.uom} besides {material} in "
                    f"{quantity.uom} (line {message.lines.get(first_element, 0)}), but "
                    "a plantstream order has one output material in one unit"
                )
            total += other.value
        return material, Quantity(total, quantity.uom)


_MATERIAL_USES = {use.casefold(): use for use in ("Consumed", "Produced")}


def _material_use(text: str | None) -> str | None:
    """Return "Consumed" or "Produced" for a MaterialUse in any case, as lot statuses
    are read. Any other value is returned unchanged for the log line that skips it."""
    if text is None:
        return None
    return _MATERIAL_USES.get(text.strip().casefold(), text)
