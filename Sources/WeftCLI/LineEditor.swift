import Foundation

/// Line editing for `weft txn` on a terminal: libedit's readline interface
/// (arrow keys, history, Ctrl-R), loaded at run time from Debian's
/// `libedit2` so that building needs no extra headers. Without it, a plain
/// prompt and `readLine`.
enum LineEditor {
    typealias ReadlineFn = @convention(c) (UnsafePointer<CChar>?) -> UnsafeMutablePointer<CChar>?
    typealias AddHistoryFn = @convention(c) (UnsafePointer<CChar>?) -> Int32

    nonisolated(unsafe) static let library: (ReadlineFn, AddHistoryFn)? = {
        for name in ["libedit.so.2", "libedit.so"] {
            guard let h = dlopen(name, RTLD_NOW | RTLD_LOCAL) else { continue }
            guard let r = dlsym(h, "readline"), let a = dlsym(h, "add_history") else { continue }
            return (unsafeBitCast(r, to: ReadlineFn.self), unsafeBitCast(a, to: AddHistoryFn.self))
        }
        return nil
    }()

    /// One line typed at `prompt` (nil at end of input). Non-empty lines
    /// join the history.
    static func readLine(prompt: String) -> String? {
        if ProcessInfo.processInfo.environment["WEFT_NO_LINE_EDITING"] == nil, let (readline, addHistory) = library {
            guard let p = prompt.withCString({ readline($0) }) else { return nil }
            defer { free(p) }
            let line = String(cString: p)
            if !line.trimmingCharacters(in: .whitespaces).isEmpty { _ = addHistory(p) }
            return line
        }
        FileHandle.standardError.write(Data(prompt.utf8))
        return Swift.readLine(strippingNewline: true)
    }
}
