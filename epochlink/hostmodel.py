"""Python reference model of the node's host interface: HostLink + RegisterBank.

An executable specification of :class:`epochlink.hdl.hostlink.HostLink` (byte-level
parser, link-layer errors, inter-byte timeout) and of
:class:`epochlink.hdl.regbank.RegisterBank` (access rules, validation, W1C). The tests
check the gateware against it byte for byte; it can also stand in for a node when testing
host software without a simulator.
"""
from __future__ import annotations

from typing import Callable, Mapping

from .hostproto import (SOF_REQUEST, Opcode, Status, build_response, crc16, request_length)
from .registers import Access, RegisterInstance, RegisterMap

__all__ = ["RegisterBankModel", "HostLinkModel"]


class RegisterBankModel:
    """The register bank's behaviour on the bus.

    ``hardware`` gives the value the hardware drives on an RO register (by instance name);
    registers missing from it read 0. Command registers (``Register.command``, served by the
    epoch engine in a NIC) are not in a bank: they answer ``BAD_ADDRESS``, as in the gateware.
    """

    def __init__(self, regmap: RegisterMap,
                 hardware: Mapping[str, int] | Callable[[RegisterInstance], int] | None = None) -> None:
        self.regmap = regmap
        self.hardware = hardware if hardware is not None else {}
        self.stored: dict[int, int] = {
            inst.address: regmap.reset(inst) for inst in regmap
            if inst.access is not Access.RO and inst.register.command is None}

    def _hw(self, inst: RegisterInstance) -> int:
        if callable(self.hardware):
            return self.hardware(inst)
        return self.hardware.get(inst.name, 0)

    def value(self, inst: RegisterInstance) -> int:
        """What a read of ``inst`` returns."""
        reg = inst.register
        if reg.constant:
            return self.regmap.reset(inst)
        if reg.access is Access.RO:
            return self._hw(inst) & reg.mask
        return self.stored[inst.address]

    def access(self, addr: int, write: bool, wdata: int = 0) -> tuple[Status, int]:
        """One bus access: (status, rdata)."""
        inst = self.regmap.at(addr)
        if inst is None or inst.register.command is not None:
            return Status.BAD_ADDRESS, 0
        current = self.value(inst)
        if not write:
            return Status.OK, current
        status = inst.register.check_write(wdata)
        if status is not Status.OK:
            return status, current
        if inst.access is Access.W1C:
            new = current & ~wdata & inst.register.mask
        else:
            new = wdata
        self.stored[addr] = new
        return Status.OK, new

    def set_bits(self, name: str, bits: int) -> None:
        """Hardware sets bits of W1C register ``name``."""
        inst = self.regmap[name]
        assert inst.access is Access.W1C
        self.stored[inst.address] |= bits & inst.register.mask

    def snapshot(self) -> dict[int, int]:
        """The host-writable state (RW and W1C values by address)."""
        return dict(self.stored)


class HostLinkModel:
    """The host link's parser, byte by byte. :meth:`feed` and :meth:`timeout` return the
    response frames the node sends, in order."""

    def __init__(self, bank: RegisterBankModel) -> None:
        self.bank = bank
        self._frame: bytearray | None = None    # bytes after the SOF, while in a frame
        self.frames_ok = 0
        self.frame_errors = 0
        self.discarded = 0
        self.executed: list[tuple[int, bool, int]] = []  # (addr, write, wdata) on the bus

    @property
    def idle(self) -> bool:
        """Hunting for a SOF (the inter-byte timeout cannot fire)."""
        return self._frame is None

    def _error(self, status: Status) -> list[bytes]:
        assert self._frame is not None
        tag = self._frame[0]
        self._frame = None
        self.frame_errors += 1
        return [build_response(tag, status, 0)]

    def feed_byte(self, byte: int) -> list[bytes]:
        if self._frame is None:
            if byte == SOF_REQUEST:
                self._frame = bytearray()
            else:
                self.discarded += 1
            return []
        frame = self._frame
        frame.append(byte)
        if len(frame) == 2 and request_length(byte) is None:
            return self._error(Status.BAD_OPCODE)
        if len(frame) < 2 or len(frame) + 1 < request_length(frame[1]):
            return []
        # complete
        if crc16(frame) != 0:
            return self._error(Status.BAD_CHECKSUM)
        self._frame = None
        tag, opcode = frame[0], frame[1]
        addr = int.from_bytes(frame[2:4], "little")
        write = opcode == Opcode.WRITE
        wdata = int.from_bytes(frame[4:8], "little") if write else 0
        self.executed.append((addr, write, wdata))
        status, rdata = self.bank.access(addr, write, wdata)
        self.frames_ok += 1
        return [build_response(tag, status, rdata)]

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for byte in data:
            out += self.feed_byte(byte)
        return out

    def timeout(self) -> list[bytes]:
        """The inter-byte timeout expires (only matters inside a frame)."""
        if self._frame is None:
            return []
        if not self._frame:
            self._frame = None
            self.discarded += 1
            return []
        return self._error(Status.TRUNCATED)
