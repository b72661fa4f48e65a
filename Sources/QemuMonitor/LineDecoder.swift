import NIOCore

/// Splits a byte stream into lines at LF, each without its terminator (nor a CR before it: QMP
/// ends lines with CRLF): the framing of QMP and the guest agent. Bytes after the last LF when
/// the stream ends are not a line and are dropped (the peer went away mid-message).
struct LineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    /// How far the readable bytes have been searched for an LF already, so that a long line
    /// arriving in many reads is not searched from its start each time.
    private var searched = 0

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let view = buffer.readableBytesView
        guard let newline = view.dropFirst(searched).firstIndex(of: UInt8(ascii: "\n")) else {
            searched = view.count
            return .needMoreData
        }
        searched = 0
        let length = newline - view.startIndex
        let carriageReturn = length > 0 && view[newline - 1] == UInt8(ascii: "\r")
        guard let line = buffer.readSlice(length: carriageReturn ? length - 1 : length) else {
            return .needMoreData
        }
        buffer.moveReaderIndex(forwardBy: carriageReturn ? 2 : 1)
        context.fireChannelRead(wrapInboundOut(line))
        return .continue
    }

    mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        buffer.moveReaderIndex(to: buffer.writerIndex)
        searched = 0
        return .needMoreData
    }
}
