import Foundation
import WeftCore

/// Map outputs of shuffles, by (shuffle, map partition).
final class ShuffleManager: @unchecked Sendable {
    let lock = NSLock()
    var outputs: [Int: [Int: ShuffleOutput]] = [:]
    let pool: MemoryPool
    let disk: SpillDirectory

    init(pool: MemoryPool, disk: SpillDirectory) {
        self.pool = pool
        self.disk = disk
    }

    func put(_ shuffle: Int, map: Int, _ out: ShuffleOutput) {
        let old = lock.withLock { () -> ShuffleOutput? in
            let old = outputs[shuffle]?[map]
            outputs[shuffle, default: [:]][map] = out
            return old
        }
        if let old { free(old) }
    }

    func has(_ shuffle: Int, map: Int) -> Bool { lock.withLock { outputs[shuffle]?[map] != nil } }

    func output(_ shuffle: Int, map: Int) throws -> ShuffleOutput {
        guard let out = lock.withLock({ outputs[shuffle]?[map] }) else { throw FetchFailed(shuffleId: shuffle, mapPartition: map) }
        return out
    }

    private func free(_ out: ShuffleOutput) {
        pool.release(out.memoryBytes)
        for r in out.runs { disk.remove(r.file) }
    }

    let demoting = NSLock()

    /// Moves finished map outputs of shuffles other than `sparing` from
    /// memory to disk, oldest shuffle first, until `needed` bytes are free
    /// in the pool. True if anything was freed. A reader holding the old
    /// output keeps reading it from memory; new readers read the file.
    func demote(_ needed: Int, sparing: Int) -> Bool {
        demoting.lock()
        defer { demoting.unlock() }
        let candidates = lock.withLock { () -> [(Int, Int, ShuffleOutput)] in
            var out: [(Int, Int, ShuffleOutput)] = []
            for s in outputs.keys.sorted() where s != sparing {
                for (m, o) in outputs[s]! where o.memoryBytes > 0 && o.demote != nil { out.append((s, m, o)) }
            }
            return out
        }
        var freed = 0
        for (s, m, old) in candidates {
            if freed >= needed { break }
            guard let new = try? old.demote?() else { continue }
            let swapped = lock.withLock { () -> Bool in
                guard outputs[s]?[m] === old else { return false }
                outputs[s]![m] = new
                return true
            }
            if swapped {
                pool.release(old.memoryBytes)
                freed += old.memoryBytes
            } else {
                // Dropped or replaced meanwhile: the new file is nobody's.
                if let f = new.runs.last?.file { disk.remove(f) }
            }
        }
        return freed > 0
    }

    /// Drops the outputs of `shuffle` that have a spill file that is gone.
    func dropUnreadable(_ shuffle: Int) {
        let maps = lock.withLock { outputs[shuffle] ?? [:] }
        for (m, out) in maps where out.runs.contains(where: { !FileManager.default.fileExists(atPath: $0.file) }) {
            drop(shuffle, map: m)
        }
    }

    func drop(_ shuffle: Int, map: Int) {
        if let old = lock.withLock({ outputs[shuffle]?.removeValue(forKey: map) }) { free(old) }
    }

    func drop(shuffle: Int? = nil) {
        let gone = lock.withLock { () -> [ShuffleOutput] in
            if let s = shuffle {
                defer { outputs[s] = nil }
                return Array(outputs[s]?.values ?? [:].values)
            }
            defer { outputs = [:] }
            return outputs.values.flatMap { $0.values }
        }
        for o in gone { free(o) }
    }
}
