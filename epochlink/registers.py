"""The epochlink register map: one declarative description used by everything.

* the gateware builds its register bank from it (:class:`epochlink.hdl.regbank.RegisterBank`),
* the host library takes addresses, field helpers and validation rules from it
  (:mod:`epochlink.host.node`),
* the documentation is generated from it: ``python -m epochlink.registers > docs/registers.md``.

Registers are 32 bits wide; addresses are 16-bit *word* addresses. The address space is cut
into blocks; a block may be instantiated several times (one link port block per port).
Address ranges reserved for later blocks are listed in :data:`RESERVED_RANGES` so nothing
has to be renumbered when they arrive.

This module does not depend on Amaranth.
"""
from __future__ import annotations

import enum
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import __version__
from .hdl.epoch_format import FenceMode, Op, Role
from .hdl.frame import LINK_COUNTERS, LinkState  # the link engine's state encoding (``LINK_STATE.state``)
from .hostproto import PROTOCOL_VERSION, Status

__all__ = [
    "Access", "Field", "Register", "Block", "Reserved", "RegisterInstance", "RegisterMap",
    "LinkState", "MAGIC", "GATEWARE_VERSION", "MAP_VERSION", "MAX_PORTS", "MAX_DOMAINS",
    "DEFAULT_DOMAINS", "PORT_BASE", "PORT_STRIDE", "NODE", "PORT", "EPOCH", "EPOCH_PORT", "DOMAIN",
    "RESERVED_RANGES", "register_map", "port_address", "domain_address", "caps_value",
    "epoch_config_value", "render_markdown",
]

#: Read from ``MAGIC``: ASCII "EPLK".
MAGIC = 0x45504C4B
#: Reported in ``VERSION``: the package version, which is the gateware version.
GATEWARE_VERSION: tuple[int, int, int] = tuple(int(x) for x in re.findall(r"\d+", __version__)[:3])  # type: ignore[assignment]
#: Version of this register map layout; bumped on incompatible changes. Reported in ``CAPS``.
MAP_VERSION = 2
#: Link port blocks the address space has room for.
MAX_PORTS = 16
#: Persistence domain blocks the address space has room for (the epoch engine's limit).
MAX_DOMAINS = 256
#: Persistence domains of a default build.
DEFAULT_DOMAINS = 8
PORT_BASE = 0x100
PORT_STRIDE = 0x40


class Access(enum.Enum):
    """How the host may access a register."""
    #: read-only: driven by hardware, or a constant; writes fail with ``READ_ONLY``
    RO = "RO"
    #: read/write: the host's value is held by the register bank and given to hardware
    RW = "RW"
    #: sticky bits set by hardware; writing 1 to a bit clears it, writing 0 leaves it
    W1C = "W1C"


@dataclass(frozen=True)
class Field:
    """A bit range ``[lsb + width - 1 : lsb]`` of a register."""
    name: str
    lsb: int
    width: int
    description: str = ""
    #: Validation rule for writes (RW registers): the field value must be ``<= max``.
    max: int | None = None
    #: Named values, e.g. a state encoding.
    values: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.lsb and 1 <= self.width and self.lsb + self.width <= 32):
            raise ValueError(f"field {self.name}: bits out of range")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"field name {self.name!r} must be a lowercase identifier")

    @property
    def msb(self) -> int:
        return self.lsb + self.width - 1

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def extract(self, value: int) -> int:
        return (value >> self.lsb) & ((1 << self.width) - 1)

    def insert(self, value: int, field_value: int) -> int:
        if not 0 <= field_value < (1 << self.width):
            raise ValueError(f"field {self.name}: {field_value} does not fit in {self.width} bits")
        return (value & ~self.mask) | (field_value << self.lsb)

    @property
    def bits(self) -> str:
        return f"{self.lsb}" if self.width == 1 else f"{self.msb}:{self.lsb}"


@dataclass(frozen=True)
class Register:
    """One 32-bit register of a block, at word ``offset`` from the block's base.

    Bits not covered by a field read as 0. For RW registers a write must pass the
    validation rule (:meth:`check_write`): no bit outside the fields may be set and every
    field with a ``max`` must be within it; otherwise the write is refused with
    ``ILLEGAL_VALUE`` and nothing changes.
    """
    name: str
    offset: int
    access: Access
    fields: tuple[Field, ...]
    reset: int = 0
    description: str = ""
    #: RO only: the value is ``reset`` forever, built into the gateware (no hardware port).
    constant: bool = False
    #: RW only: a write is an epoch engine command (:class:`~epochlink.hdl.epoch_format.Op`)
    #: rather than a store; the engine may refuse it (``REFUSED_*`` statuses). Such registers
    #: are served by :class:`~epochlink.hdl.epoch_regs.EpochRegisters`, not the register bank.
    command: Op | None = None
    #: RO only: an event counter (32-bit, wrapping). The NIC keeps these in a
    #: :class:`~epochlink.hdl.counters.CounterBank` (block RAM) rather than the register bank.
    counter: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.name):
            raise ValueError(f"register name {self.name!r} must be an uppercase identifier")
        if self.constant and self.access is not Access.RO:
            raise ValueError(f"{self.name}: only RO registers can be constant")
        if self.command is not None and self.access is not Access.RW:
            raise ValueError(f"{self.name}: only RW registers can be commands")
        if self.counter and (self.access is not Access.RO or self.constant):
            raise ValueError(f"{self.name}: only hardware-driven RO registers can be counters")
        if not self.fields:
            raise ValueError(f"{self.name}: a register needs at least one field")
        used = 0
        names = set()
        for f in self.fields:
            if used & f.mask:
                raise ValueError(f"{self.name}: field {f.name} overlaps another field")
            if f.name in names:
                raise ValueError(f"{self.name}: duplicate field {f.name}")
            used |= f.mask
            names.add(f.name)
            if f.max is not None and self.access is not Access.RW:
                raise ValueError(f"{self.name}.{f.name}: only RW fields take a max rule")
        if self.reset & ~used:
            raise ValueError(f"{self.name}: reset value sets bits outside the fields")
        if self.check_write(self.reset) is not Status.OK and self.access is Access.RW:
            raise ValueError(f"{self.name}: reset value violates the validation rule")

    @property
    def mask(self) -> int:
        """Bits covered by fields."""
        m = 0
        for f in self.fields:
            m |= f.mask
        return m

    @property
    def width(self) -> int:
        """Bits from 0 to the highest field bit (the width of the hardware port)."""
        return max(f.msb for f in self.fields) + 1

    @property
    def is_plain(self) -> bool:
        """A single field starting at bit 0 (the hardware port is a plain integer)."""
        return len(self.fields) == 1 and self.fields[0].lsb == 0

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def check_write(self, value: int) -> Status:
        """The status a write of ``value`` gets (OK, READ_ONLY or ILLEGAL_VALUE)."""
        if self.access is Access.RO:
            return Status.READ_ONLY
        if not 0 <= value <= 0xFFFF_FFFF:
            return Status.ILLEGAL_VALUE
        if self.access is Access.W1C:
            return Status.OK          # bits outside the fields are ignored
        if value & ~self.mask:
            return Status.ILLEGAL_VALUE
        for f in self.fields:
            if f.max is not None and f.extract(value) > f.max:
                return Status.ILLEGAL_VALUE
        return Status.OK

    def decode(self, value: int) -> dict[str, int]:
        """Field values of a register value."""
        return {f.name: f.extract(value) for f in self.fields}

    def encode(self, **fields: int) -> int:
        """A register value from field values (missing fields are 0)."""
        value = 0
        for name, v in fields.items():
            value = self.field(name).insert(value, int(v))
        return value


def _value(name: str, offset: int, access: Access, width: int, description: str, *,
           reset: int = 0, constant: bool = False, max: int | None = None,
           command: Op | None = None) -> Register:
    """A register holding one unsigned value ``[width-1:0]`` (field ``value``)."""
    return Register(name, offset, access, (Field("value", 0, width, max=max),), reset,
                    description, constant, command)


def _counter(name: str, offset: int, description: str) -> Register:
    return Register(name, offset, Access.RO, (Field("value", 0, 32),), 0,
                    description + " (32-bit, wraps)", counter=True)


@dataclass(frozen=True)
class Block:
    """A group of registers at ``base``; ``count`` instances, ``stride`` words apart."""
    name: str
    base: int
    size: int
    registers: tuple[Register, ...]
    description: str = ""
    count: int = 1
    stride: int = 0
    #: For multi-instance blocks: the build parameter giving how many instances are
    #: present (``"ports"`` or ``"domains"``); the others answer ``BAD_ADDRESS``.
    count_by: str = "ports"

    def __post_init__(self) -> None:
        offsets = set()
        for r in self.registers:
            if not 0 <= r.offset < self.size:
                raise ValueError(f"{self.name}.{r.name}: offset outside the block")
            if r.offset in offsets:
                raise ValueError(f"{self.name}.{r.name}: offset {r.offset:#x} used twice")
            offsets.add(r.offset)
        if self.count > 1 and self.stride < self.size:
            raise ValueError(f"{self.name}: instances overlap")

    def register(self, name: str) -> Register:
        for r in self.registers:
            if r.name == name:
                return r
        raise KeyError(f"block {self.name} has no register {name!r}")

    def instance_base(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"{self.name} has {self.count} instances, not {index + 1}")
        return self.base + index * self.stride

    @property
    def end(self) -> int:
        """Last word address of the whole block range (all instances)."""
        return self.base + (self.count - 1) * self.stride + self.size - 1


@dataclass(frozen=True)
class Reserved:
    """An address range kept free for a later block."""
    name: str
    start: int
    end: int  # inclusive
    description: str


@dataclass(frozen=True)
class RegisterInstance:
    """A register at its address (for a multi-instance block: of one instance)."""
    block: Block
    index: int | None
    register: Register

    @property
    def address(self) -> int:
        return self.block.instance_base(self.index or 0) + self.register.offset

    @property
    def name(self) -> str:
        """``SCRATCH`` for single blocks, ``PORT1.FRAMES_TX`` for instances."""
        if self.index is None:
            return self.register.name
        return f"{self.block.name}{self.index}.{self.register.name}"

    @property
    def access(self) -> Access:
        return self.register.access


# --------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------

NODE = Block("NODE", 0x000, 0x100, (
    _value("MAGIC", 0x00, Access.RO, 32, 'Constant 0x45504C4B ("EPLK"): identifies an epochlink node.',
           reset=MAGIC, constant=True),
    Register("VERSION", 0x01, Access.RO, (
        Field("patch", 0, 8, "Patch version."), Field("minor", 8, 8, "Minor version."),
        Field("major", 16, 8, "Major version.")),
        reset=(GATEWARE_VERSION[0] << 16) | (GATEWARE_VERSION[1] << 8) | GATEWARE_VERSION[2],
        description="Gateware version (the epochlink package version it was built from).",
        constant=True),
    _value("NODE_ID", 0x02, Access.RO, 16, "This node's identifier (board configuration)."),
    Register("CAPS", 0x03, Access.RO, (
        Field("ports", 0, 5, "Number of link ports (port blocks present)."),
        Field("map_version", 8, 8, "Register map layout version."),
        Field("proto_version", 16, 8, "Host-link frame format version.")),
        description="Capabilities of this build (constant per bitstream; reset column: as built "
                    "by `register_map(ports=2)`).", constant=True),
    _value("SCRATCH", 0x04, Access.RW, 32, "Free for host tests; no hardware effect."),
    _counter("HOST_FRAMES", 0x10, "Host-link requests executed on the register bus"),
    _counter("HOST_ERRORS", 0x11,
             "Host-link requests answered with a link-layer error (bad checksum, unknown opcode, truncated)"),
    _counter("HOST_DISCARDED", 0x12, "Bytes the host link discarded while hunting for a SOF"),
    _counter("UART_FRAMING_ERRORS", 0x13, "UART bytes dropped for a bad stop bit (includes breaks)"),
    _counter("UART_OVERRUNS", 0x14, "UART bytes dropped because the previous byte was not taken yet"),
), description="Node identity, host-interface statistics. 0x05-0x0F and 0x15-0xFF are reserved "
               "for node-level registers.")

PORT = Block("PORT", PORT_BASE, PORT_STRIDE, (
    Register("LINK_STATE", 0x00, Access.RO, (
        Field("state", 0, 2, "Link state.", values=tuple((s.name, s.value) for s in LinkState)),
        Field("version", 8, 8, "Link protocol version agreed with the peer (valid when UP).")),
        description="Link state machine status."),
    _value("PEER_ID", 0x01, Access.RO, 16, "NODE_ID of the peer, learned during link bring-up."),
    Register("CONTROL", 0x02, Access.RW, (
        Field("enable", 0, 1, "Link enabled; 0 holds the link DOWN."),
        Field("loopback", 1, 1, "Loopback self-test: the port talks to itself.")),
        reset=0x1, description="Port control. Other bits must be written 0."),
    Register("EVENTS", 0x03, Access.W1C, (
        Field("link_down", 0, 1, "The link went down."),
        Field("crc_error", 1, 1, "A frame with a bad CRC was received."),
        Field("malformed", 2, 1, "A malformed frame was received."),
        Field("abort", 3, 1, "A transfer was aborted.")),
        description="Sticky event flags set by hardware; write 1 to clear."),
    _value("CHAN_ERROR_THRESHOLD", 0x04, Access.RW, 32,
           "Fault injection of the channel model: bit-error threshold (0 = no injected errors)."),
    _value("CHAN_CUT", 0x05, Access.RW, 1, "Fault injection: 1 cuts the channel (nothing gets through)."),
    *(_counter(name.upper(), 0x10 + i, text[0].upper() + text[1:])
      for i, (name, text) in enumerate(LINK_COUNTERS.items())),
), description="One per link port p, at 0x100 + 0x40*p. Offsets 0x06-0x0F (control/status) "
               f"and 0x{0x10 + len(LINK_COUNTERS):02X}-0x3F (counters) are reserved for more link registers.",
   count=MAX_PORTS, stride=PORT_STRIDE)

_ROLE_VALUES = tuple((r.name, r.value) for r in Role)

EPOCH = Block("EPOCH", 0x0800, 0x40, (
    Register("STATUS", 0x00, Access.RO, (
        Field("online", 0, 1, "The node takes part in the protocol (EPOCH.ONLINE)."),
        Field("local_valid", 1, 1, "At least one domain is enabled (LOCAL is defined)."),
        Field("report_valid", 2, 1, "LOCAL is valid and every CHILD port has reported.")),
        description="Epoch engine status."),
    _value("LOCAL", 0x01, Access.RO, 32, "LOCAL: the meet (minimum) of PERSISTED over the enabled domains."),
    _value("REPORT", 0x02, Access.RO, 32,
           "This node's subtree meet: min(LOCAL, the reports of its CHILD ports)."),
    _value("REPORT_SENT", 0x03, Access.RO, 32, "The last REPORT sent to the parent (0: none yet)."),
    _value("COMMITTED", 0x04, Access.RO, 32,
           "COMMITTED: the epoch the whole cluster has made durable in every enabled domain "
           "(this node's Conv(P,e) certificate). Never decreases until the node is reset."),
    _value("ONLINE", 0x05, Access.RW, 1,
           "Write 1 once every domain is enabled at its durable epoch (after a reset: after "
           "restoring them): the node starts reporting and, as root, committing. 0 stops it.",
           max=1, command=Op.ONLINE),
    _value("ACTIVE", 0x06, Access.RW, 8,
           "ACTIVE protocol (firmware) version of this node, 1..255 (0 is refused). Written "
           "during a rolling upgrade or rollback.", command=Op.ACTIVE),
    Register("VERSIONS", 0x07, Access.RO, (
        Field("active", 0, 8, "ACTIVE version of this node."),
        Field("subtree", 8, 8, "Minimum ACTIVE over this node's subtree."),
        Field("converged", 16, 8, "Cluster-wide converged version (min ACTIVE); 0 = not known yet.")),
        description="Protocol (firmware) versions as converged by the epoch engine."),
    Register("SUPPORTED", 0x08, Access.RO, (
        Field("min", 0, 8, "Lowest link protocol version this build speaks."),
        Field("max", 8, 8, "Highest link protocol version this build speaks.")),
        description="Link protocol versions this node supports (board configuration)."),
    Register("FENCE_MODE", 0x09, Access.RW, (
        Field("mode", 0, 2, "What the epoch fence does with payload from another epoch.", max=2,
              values=tuple((f.name, f.value) for f in FenceMode)),),
        description="Epoch fence of the payload datapath, for every port."),
    Register("CONFIG", 0x0A, Access.RO, (
        Field("domains", 0, 9, "Persistence domains (DOMAIN blocks present)."),
        Field("epoch_width", 16, 6, "Width of epochs in bits.")),
        description="Epoch engine build parameters (reset column: the default build).", constant=True),
    _value("RESET", 0x0B, Access.RW, 1,
           "Write 1: reset the epoch engine as at power-up (PERSISTED, COMMITTED, roles and "
           "ONLINE lost; links stay up). The cluster-wide rollback after a restore from "
           "COMMITTED uses it (docs/epoch.md). Reads the last value written.", max=1),
    _counter("REFUSED", 0x10, "Epoch commands refused (any status but OK)"),
    _counter("MALFORMED", 0x11, "Epoch messages dropped as malformed"),
    _counter("MISROUTED", 0x12, "Epoch messages of the wrong type for the port's role"),
), description="Epoch engine, node-wide: LOCAL, REPORT and COMMITTED epochs, protocol versions, "
               "control and counters.")

EPOCH_PORT = Block("EPOCH_PORT", 0x0840, 0x08, (
    Register("ROLE", 0x00, Access.RW, (
        Field("role", 0, 2, "Role of the link port in the commit tree.", max=2, values=_ROLE_VALUES),),
        description="Role of link port p in the commit tree: OFF, PARENT (at most one port) or "
                    "CHILD. A second PARENT is refused with ILLEGAL_VALUE.", command=Op.ROLE),
    Register("NEIGHBOUR", 0x01, Access.RO, (
        Field("heard", 0, 1, "CHILD: the child has reported; PARENT: the parent has sent a COMMIT."),
        Field("version", 8, 8, "Subtree version in the child's latest REPORT.")),
        description="What the epoch engine has heard on port p."),
    _value("CHILD_REPORT", 0x02, Access.RO, 32, "Highest REPORT received from the child on port p."),
    _counter("FENCE_OLDER", 0x03, "Payload messages received on port p from an older epoch"),
    _counter("FENCE_NEWER", 0x04, "Payload messages received on port p from a newer epoch"),
    _counter("FENCE_DROPPED", 0x05, "Payload messages dropped by the epoch fence on port p"),
), description="Epoch engine, per link port p, at 0x840 + 0x8*p.", count=MAX_PORTS, stride=0x08)

DOMAIN = Block("DOMAIN", 0x1000, 0x04, (
    _value("PERSISTED", 0x00, Access.RW, 32,
           "PERSISTED epoch of domain d (0 while disabled). Write e once the domain's data for "
           "epoch e is durable. Epochs only rise: a lower e is refused (REFUSED_LOWER); a "
           "disabled domain refuses it (REFUSED_DISABLED).", command=Op.PERSIST),
    _value("ENABLE", 0x01, Access.RW, 32,
           "Reads 1 while domain d is enabled. Write e to enable it with durable epoch e "
           "(PERSISTED := e); refused (REFUSED_LOWER) below the node's floor, max(COMMITTED, "
           "REPORT_SENT), or below PERSISTED of an enabled domain.", command=Op.ENABLE),
    _value("DISABLE", 0x02, Access.RW, 1,
           "Write 1 to take domain d out of LOCAL (0 does nothing). Reads 0.", max=1,
           command=Op.DISABLE),
), description="Epoch engine, per persistence domain d, at 0x1000 + 0x4*d (domains present: "
               "EPOCH.CONFIG.domains).", count=MAX_DOMAINS, stride=0x04, count_by="domains")

#: Ranges kept for blocks to come. Everything not in a block or here is unallocated.
RESERVED_RANGES: tuple[Reserved, ...] = (
    Reserved("LINK_EXT", 0x0500, 0x07FF, "More link-level blocks (e.g. shared link engine, channel model)."),
    Reserved("EPOCH_EXT", 0x08C0, 0x08FF, "More epoch engine registers."),
    Reserved("DOMAIN_EXT", 0x1400, 0x1FFF, "More per-domain registers or domains."),
    Reserved("DEBUG", 0xF000, 0xFFFF, "Debug and test registers."),
)


class RegisterMap:
    """The registers of one build: the single blocks, ``ports`` instances of the per-port
    blocks and ``domains`` instances of the per-domain block.

    Look registers up by name (``map["SCRATCH"]``, ``map["PORT1.FRAMES_TX"]``,
    ``map["DOMAIN3.PERSISTED"]``) or address (:meth:`at`). Addresses do not depend on
    ``ports`` or ``domains``; instances beyond them are absent (``BAD_ADDRESS``).
    """

    def __init__(self, blocks: Iterable[Block], ports: int | None = None,
                 reserved: Iterable[Reserved] = (), constants: dict[str, int] | None = None,
                 domains: int | None = None) -> None:
        self.blocks = tuple(blocks)
        self._constants = dict(constants or {})
        self.reserved = tuple(reserved)
        self.ports = ports
        self.domains = domains
        self.instances: tuple[RegisterInstance, ...] = tuple(self._instances())
        self._by_name = {i.name: i for i in self.instances}
        self._by_address = {i.address: i for i in self.instances}
        if len(self._by_name) != len(self.instances):
            raise ValueError("duplicate register names")
        if len(self._by_address) != len(self.instances):
            raise ValueError("overlapping registers")
        spans = [(b.base, b.end, b.name) for b in self.blocks]
        spans += [(r.start, r.end, r.name) for r in self.reserved]
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 <= e0:
                raise ValueError(f"address ranges of {n0} and {n1} overlap")
        if spans and spans[-1][1] > 0xFFFF:
            raise ValueError("address space is 16 bits")
        for name in self._constants:
            if not self._by_name[name].register.constant:
                raise ValueError(f"{name} is not a constant register")

    def reset(self, inst: RegisterInstance) -> int:
        """Reset value of ``inst``; for a constant register, its value in this build."""
        return self._constants.get(inst.name, inst.register.reset)

    def _instances(self) -> Iterator[RegisterInstance]:
        for block in self.blocks:
            count = block.count
            limit = getattr(self, block.count_by, None) if block.count > 1 else None
            if limit is not None:
                count = min(count, limit)
            for index in range(count):
                for reg in block.registers:
                    yield RegisterInstance(block, index if block.count > 1 else None, reg)

    def __getitem__(self, name: str) -> RegisterInstance:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[RegisterInstance]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def at(self, address: int) -> RegisterInstance | None:
        """The register at ``address``, or None."""
        return self._by_address.get(address)

    def address(self, name: str) -> int:
        return self._by_name[name].address


def register_map(ports: int = 2, domains: int = DEFAULT_DOMAINS, epoch_width: int = 32) -> RegisterMap:
    """The register map of a node with ``ports`` link ports and ``domains`` persistence domains."""
    if not 0 <= ports <= MAX_PORTS:
        raise ValueError(f"ports must be 0..{MAX_PORTS}")
    if not 1 <= domains <= MAX_DOMAINS:
        raise ValueError(f"domains must be 1..{MAX_DOMAINS}")
    return RegisterMap((NODE, PORT, EPOCH, EPOCH_PORT, DOMAIN), ports=ports, domains=domains,
                       reserved=RESERVED_RANGES,
                       constants={"CAPS": caps_value(ports),
                                  "CONFIG": epoch_config_value(domains, epoch_width)})


def port_address(port: int, name: str) -> int:
    """Address of register ``name`` of link port ``port``."""
    return PORT.instance_base(port) + PORT.register(name).offset


def domain_address(domain: int, name: str) -> int:
    """Address of register ``name`` of persistence domain ``domain``."""
    return DOMAIN.instance_base(domain) + DOMAIN.register(name).offset


def epoch_config_value(domains: int = DEFAULT_DOMAINS, epoch_width: int = 32) -> int:
    """The ``EPOCH.CONFIG`` value of a build."""
    return EPOCH.register("CONFIG").encode(domains=domains, epoch_width=epoch_width)


def caps_value(ports: int) -> int:
    """The ``CAPS`` value of a build with ``ports`` link ports."""
    return NODE.register("CAPS").encode(ports=ports, map_version=MAP_VERSION,
                                        proto_version=PROTOCOL_VERSION)


# --------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------

def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _render_block(block: Block, out: list[str]) -> None:
    if block.count > 1:
        var = block.count_by[0]
        out.append(f"## {block.name} block (instances at {block.base:#06x} + {block.stride:#x}*{var})\n")
    else:
        out.append(f"## {block.name} block ({block.base:#06x}-{block.end:#06x})\n")
    if block.description:
        out.append(_md(block.description) + "\n")
    off = "Offset" if block.count > 1 else "Address"
    out.append(f"| {off} | Register | Access | Reset | Description |")
    out.append("|---|---|---|---|---|")
    for r in block.registers:
        at = r.offset if block.count > 1 else block.base + r.offset
        access = r.access.value + (" (const)" if r.constant else "") + (" (cmd)" if r.command else "")
        reset_value = {"CAPS": caps_value(2), "CONFIG": epoch_config_value()}.get(r.name, r.reset) \
            if r.constant else r.reset
        reset = f"`{reset_value:#010x}`" if r.access is not Access.RO or r.constant else "hw"
        if r.command:
            reset = "engine"
        at_text = f"0x{at:02x}" if block.count > 1 else f"{at:#06x}"
        out.append(f"| `{at_text}` | {r.name} | {access} | {reset} | {_md(r.description)} |")
    out.append("")
    for r in block.registers:
        if r.is_plain and not r.fields[0].values and r.fields[0].max is None:
            continue
        out.append(f"### {block.name}.{r.name} fields\n")
        out.append("| Bits | Field | Description |")
        out.append("|---|---|---|")
        for f in sorted(r.fields, key=lambda f: f.lsb):
            desc = f.description
            if f.values:
                desc += " " + ", ".join(f"{n}={v}" for n, v in f.values)
            if f.max is not None:
                desc += f" Writes above {f.max} are refused."
            out.append(f"| {f.bits} | {f.name} | {_md(desc.strip())} |")
        out.append("")


def render_markdown() -> str:
    """The register map as Markdown (the content of ``docs/registers.md``)."""
    out = [
        "# epochlink register map",
        "",
        "<!-- Generated by `python -m epochlink.registers > docs/registers.md`; do not edit. -->",
        "",
        f"Register map version {MAP_VERSION}, gateware {'.'.join(map(str, GATEWARE_VERSION))}. "
        "Registers are 32 bits; addresses are 16-bit word addresses. Bits outside the listed "
        "fields read as 0. Access: RO (read-only, driven by hardware; writes fail with "
        "READ_ONLY), RO (const) (fixed in the bitstream), RW (read/write; writes setting bits "
        "outside the fields, or a field above its maximum, fail with ILLEGAL_VALUE and change "
        "nothing), W1C (sticky bits set by hardware, writing 1 clears), RW (cmd) (a write is "
        "a command to the epoch engine, which may refuse it with REFUSED_LOWER or "
        "REFUSED_DISABLED and change nothing; reads return the engine's state). Accesses to "
        "addresses without a register fail with BAD_ADDRESS. Counters wrap (a build with a "
        "narrower `counter_width` wraps them at 2^counter_width) and are kept in block RAM: "
        "a read returns the count as of a few microseconds earlier.",
        "",
        "## Address space",
        "",
        "| Range | Block | Description |",
        "|---|---|---|",
    ]
    rows = [(b.base, b.end, b.name, b.description.split(". ")[0]) for b in (NODE, EPOCH)]
    rows.append((PORT.base, PORT.end, "PORT[0..15]",
                 f"Link port p at {PORT.base:#06x} + {PORT.stride:#x}*p (ports present: CAPS.ports)"))
    rows.append((EPOCH_PORT.base, EPOCH_PORT.end, "EPOCH_PORT[0..15]",
                 f"Epoch engine, link port p at {EPOCH_PORT.base:#06x} + {EPOCH_PORT.stride:#x}*p"))
    rows.append((DOMAIN.base, DOMAIN.end, f"DOMAIN[0..{MAX_DOMAINS - 1}]",
                 f"Persistence domain d at {DOMAIN.base:#06x} + {DOMAIN.stride:#x}*d "
                 "(domains present: EPOCH.CONFIG.domains)"))
    rows += [(r.start, r.end, f"{r.name} (reserved)", r.description) for r in RESERVED_RANGES]
    for start, end, name, desc in sorted(rows):
        out.append(f"| `{start:#06x}`-`{end:#06x}` | {name} | {_md(desc)} |")
    out.append("")
    for block in (NODE, PORT, EPOCH, EPOCH_PORT, DOMAIN):
        _render_block(block, out)
    out.append("## Register bus status codes\n")
    out.append("| Code | Name | Meaning |")
    out.append("|---|---|---|")
    meaning = {
        Status.OK: "done",
        Status.BAD_ADDRESS: "no register at the address; nothing changed",
        Status.READ_ONLY: "write to a RO register; nothing changed",
        Status.ILLEGAL_VALUE: "write refused by the register's validation rule (or the epoch "
                              "engine's: ACTIVE 0, a second PARENT port); nothing changed",
        Status.REFUSED_DISABLED: "epoch command refused: PERSISTED written to a disabled domain; "
                                 "nothing changed",
        Status.REFUSED_LOWER: "epoch command refused: the epoch would go down; nothing changed",
    }
    for s, text in meaning.items():
        out.append(f"| {int(s)} | {s.name} | {text} |")
    out.append("")
    out.append("The host-link frame format and its link-layer status codes are described in "
               "`epochlink/hostproto.py`.")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
