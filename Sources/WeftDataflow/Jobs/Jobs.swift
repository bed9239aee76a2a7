import Foundation
import WeftCore
import WeftRuntime

/// What a built-in job needs: its input snapshot and parameters.
public struct JobParameters: Sendable, Equatable {
    public var input: String
    public var output: String?
    public var at: Timestamp?
    public var iterations = 10
    public var damping = 0.85
    public var overwrite = false
    /// Clusters (kmeans).
    public var k = 2
    /// Words to count in error messages (logmining).
    public var words: [String] = []
    /// Second input table (join).
    public var input2: String?
    /// Copies of pagerank's graph and of each iteration's ranks persisted
    /// reliably in the store (`--reliable N`); 0: in memory only, and a
    /// lost node's share is recomputed from lineage.
    public var reliable = 0
    public init(input: String) { self.input = input }
}

public struct JobResult: Sendable {
    public var summary: [String] = []
    public var outputRows = 0
    public var malformedLines = 0
    public var metrics = JobMetrics()
    public var snapshotTs: Timestamp = 0
    public var committedTs: Timestamp?
    /// Output blocks of losing task attempts deleted after the flip
    /// (`PartitionedOutput.collectLosers`).
    public var loserBlocksDeleted = 0
}

/// Jobs are registered by name in the binary: a process rebuilds the same
/// lineage from (job, parameters, snapshot), so a task can be named rather
/// than shipped as a closure.
public enum BuiltinJobs {
    public static let all: [(name: String, about: String)] = [
        ("wordcount", "count of every word (maximal runs of non-whitespace) in a table of lines; output word -> count"),
        ("pagerank", "PageRank over `src dst` lines, as Spark's bundled example (--iterations, --damping, --reliable N); output vertex -> rank"),
        ("kmeans", "Lloyd's k-means over lines of numbers; first k points start as centres (--k, --iterations); output centre index -> coordinates"),
        ("logreg", "logistic regression, full-batch gradient descent with step 1/N over `y x1 x2 ...` lines, y in {-1,1} (--iterations); output feature -> weight"),
        ("logmining", "keep lines starting with ERROR, take the third tab-separated field, persist, count the messages containing each word (--words a,b); output word -> count"),
        ("join", "inner join of two key<TAB>value tables (--input, --input2), every matching pair; output key<TAB>n -> v1<TAB>v2"),
        ("sort", "sort key<TAB>value lines by key (numerically when every key is a number); output position -> key<TAB>value"),
    ]

    /// A job a program registers (see `register`): its output rows, built
    /// from the parameters over a context and the cluster's client.
    public typealias Planner = @Sendable (_ params: JobParameters, _ sc: DataflowContext, _ client: WeftClient) throws -> RDD<(Bytes, Bytes)>

    nonisolated(unsafe) static var registered: [String: (about: String, plan: Planner)] = [:]
    static let registryLock = NSLock()

    /// Registers a job of the program's own, by name. A program that
    /// registers jobs and also serves as the cluster's nodes
    /// (`WeftNode.serve`) runs them distributed: the driver and every
    /// executor rebuild the same lineage from the name and parameters, so
    /// `plan` must be deterministic given the results of the actions it
    /// runs (no clock, no unseeded randomness). Register before serving.
    public static func register(_ name: String, about: String, plan: @escaping Planner) {
        precondition(!all.contains { $0.name == name }, "\(name) is a built-in job")
        registryLock.withLock { registered[name] = (about, plan) }
    }

    static func registeredJob(_ name: String) -> (about: String, plan: Planner)? { registryLock.withLock { registered[name] } }

    /// The built-in jobs and the program's own.
    public static var names: [String] { all.map(\.name) + registryLock.withLock { registered.keys.sorted() } }

    /// True if this binary's registry has a job of that name.
    public static func knows(_ name: String) -> Bool { all.contains { $0.name == name } || registeredJob(name) != nil }

    /// Builds the job's final RDD (output rows). Iterative jobs (kmeans,
    /// logreg), logmining and sort run actions while they plan (centres,
    /// weights, counts, samples); with `explainOnly` nothing runs, and the
    /// RDD returned is one iteration's lineage (kmeans, logreg), the first
    /// word's count (logmining), or the sort without its sampled bounds.
    public static func plan(_ name: String, _ p: JobParameters, sc: DataflowContext, client: WeftClient, malformed: Accumulator,
                            explainOnly: Bool = false) throws -> RDD<(Bytes, Bytes)> {
        if let job = registeredJob(name) { return try job.plan(p, sc, client) }
        guard all.contains(where: { $0.name == name }) else {
            throw WeftError(.invalidArgument, "unknown job \(name); `weft job list` shows the jobs (\(names.joined(separator: ", ")))")
        }
        let rows = try sc.table(p.input, client: client, at: p.at)
        let input = textLines(rows)
        func out<K: CustomStringConvertible, V: CustomStringConvertible>(_ r: RDD<(K, V)>) -> RDD<(Bytes, Bytes)> {
            r.map { (Array($0.0.description.utf8), Array($0.1.description.utf8)) }
        }
        switch name {
        case "wordcount":
            return out(wordCount(input))
        case "pagerank":
            // (`run` tries integer vertices first; see `integerPageRank`.)
            return out(pageRank(input, iterations: p.iterations, damping: p.damping, malformed: malformed))
        case "kmeans":
            let keyed = rows.map { (String(decoding: $0.0, as: UTF8.self), String(decoding: $0.1, as: UTF8.self)) }
            if explainOnly { return out(kMeansStep(kMeansPoints(keyed, malformed: malformed), centres: [])) }
            let centres = try kMeans(keyed, k: p.k, iterations: p.iterations, malformed: malformed)
            return sc.parallelize(centres.enumerated().map { (Array(String($0.offset).utf8), Array($0.element.map { "\($0)" }.joined(separator: " ").utf8)) }, partitions: 1)
        case "logreg":
            if explainOnly {
                return logRegGradient(logRegPoints(input, malformed: malformed), w: []).map { (Array("gradient".utf8), Array("\($0)".utf8)) }
            }
            let w = try logisticRegression(input, iterations: p.iterations, malformed: malformed)
            return sc.parallelize(w.enumerated().map { (Array(String($0.offset).utf8), Array("\($0.element)".utf8)) }, partitions: 1)
        case "logmining":
            guard !p.words.isEmpty else { throw WeftError(.invalidArgument, "logmining needs --words w1,w2,...") }
            if explainOnly {
                let w = p.words[0]
                return errorMessages(input, client: client).filter { $0.contains(w) }.map { (Array(w.utf8), Array($0.utf8)) }
            }
            let counts = try logMining(input, words: p.words, client: client)
            return sc.parallelize(counts.map { (Array($0.0.utf8), Array(String($0.1).utf8)) }, partitions: 1)
        case "join":
            guard let second = p.input2 else { throw WeftError(.invalidArgument, "join needs --input2 TABLE") }
            let right = textLines(try sc.table(second, client: client, at: p.at))
            let joined = keyValues(input, malformed).join(keyValues(right, malformed))
            return joined.groupByKey().flatMap { kv -> [(Bytes, Bytes)] in
                kv.1.sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }.enumerated().map {
                    (Array("\(kv.0)\t\(String(format: "%06d", $0.offset))".utf8), Array("\($0.element.0)\t\($0.element.1)".utf8))
                }
            }
        case "sort":
            let pairs = keyValues(input, malformed).persist()
            if explainOnly {
                // Numeric or text order, and the range bounds, are found when it runs.
                return pairs.sortByKey(bounds: [], ascending: true).map { (Array($0.0.utf8), Array($0.1.utf8)) }
            }
            let numeric = try pairs.keys().filter { !isPlainNumber($0) }.count() == 0
            let sorted: RDD<(String, String)>
            if numeric {
                sorted = try pairs.map { (NumericKey(Double($0.0)!, $0.0), $0.1) }.sortByKey().map { ($0.0.text, $0.1) }
            } else {
                sorted = try pairs.sortByKey()
            }
            return try sorted.zipWithIndex().map { (Array(String(format: "%012d", $0.1).utf8), Array("\($0.0.0)\t\($0.0.1)".utf8)) }
        default:
            preconditionFailure()
        }
    }

    /// A table as the text lines a job reads: a `lines` table's lines, or a
    /// `kv` table's rows as `key<TAB>value` lines (so a table loaded with
    /// `--format kv`, or a job's output, can feed join, sort and the rest).
    static func textLines(_ rows: RDD<(Bytes, Bytes)>) -> RDD<String> {
        if let table = rows as? TableRDD { return TableLinesRDD(table) }
        return rows.values().map { String(decoding: $0, as: UTF8.self) }
    }

    /// `key<TAB>value` lines; a line without a TAB is counted as malformed.
    static func keyValues(_ lines: RDD<String>, _ malformed: Accumulator) -> RDD<(String, String)> {
        lines.mapPartitionsWithIndex { _, xs, ctx in
            var out: [(String, String)] = []
            for l in xs {
                if let tab = l.firstIndex(of: "\t") { out.append((String(l[..<tab]), String(l[l.index(after: tab)...]))) } else { malformed.add(1, in: ctx) }
            }
            return out
        }
    }

    static func numbers(_ line: String) -> [Double]? {
        let f = line.split(whereSeparator: { $0 == " " || $0 == "," || $0 == "\t" })
        let xs = f.compactMap { Double($0) }
        return xs.count == f.count && !xs.isEmpty ? xs : nil
    }

    /// Lloyd's algorithm as the issue states it: the first k points (in
    /// input order) start as centres; the nearest centre wins, the lowest
    /// index on a tie; an empty cluster keeps its centre.
    public static func kMeans(_ rows: RDD<(String, String)>, k: Int, iterations: Int, malformed: Accumulator) throws -> [[Double]] {
        guard k > 0 else { throw WeftError(.invalidArgument, "--k must be at least 1") }
        let points = kMeansPoints(rows, malformed: malformed)
        var centres = try points.takeOrdered(k) { $0.0 < $1.0 }.map(\.1)
        guard centres.count == k else { throw WeftError(.invalidArgument, "kmeans needs at least k = \(k) points, the input has \(centres.count)") }
        let dim = centres[0].count
        let otherDims = try points.filter { $0.1.count != dim }.count()
        if otherDims > 0 {
            throw WeftError(.invalidArgument, "kmeans: \(otherDims) points do not have \(dim) coordinates like the first point; every point needs the same dimension")
        }
        for _ in 0..<iterations {
            let sums = try kMeansStep(points, centres: centres).collectAsMap()
            for i in 0..<k {
                if let s = sums[i], let n = s.last, n > 0 { centres[i] = s.dropLast().map { $0 / n } }
            }
        }
        return centres
    }

    /// The points of kmeans, keyed by row key (input order), persisted.
    static func kMeansPoints(_ rows: RDD<(String, String)>, malformed: Accumulator) -> RDD<(String, [Double])> {
        rows.mapPartitionsWithIndex { _, xs, ctx in
            xs.compactMap { r -> (String, [Double])? in
                guard let v = numbers(r.1) else {
                    if !r.1.allSatisfy(\.isWhitespace) { malformed.add(1, in: ctx) }
                    return nil
                }
                return (r.0, v)
            }
        }.persist().setName("points")
    }

    /// One Lloyd iteration: each point to its nearest centre (the lowest
    /// index on a tie), then per centre the coordinate sums and the count
    /// (as a last coordinate).
    static func kMeansStep(_ points: RDD<(String, [Double])>, centres: [[Double]]) -> RDD<(Int, [Double])> {
        points.map { p -> (Int, [Double]) in
            var best = 0
            var bestD = Double.infinity
            for (i, c) in centres.enumerated() {
                var d = 0.0
                for j in 0..<min(c.count, p.1.count) { d += (p.1[j] - c[j]) * (p.1[j] - c[j]) }
                if d < bestD { best = i; bestD = d }
            }
            return (best, p.1 + [1])
        }.reduceByKey { a, b in zip(a, b).map { $0 + $1 } }.setName("centreSums")
    }

    /// w <- w - (1/N) * sum((sigmoid(y * w.x) - 1) * y * x), from w = 0.
    public static func logisticRegression(_ lines: RDD<String>, iterations: Int, malformed: Accumulator) throws -> [Double] {
        let points = logRegPoints(lines, malformed: malformed)
        let n = try points.count()
        guard n > 0, let dim = try points.take(1).first?.1.count else { throw WeftError(.invalidArgument, "logreg: the input has no valid `y x1 x2 ...` line") }
        var w = [Double](repeating: 0, count: dim)
        for _ in 0..<iterations {
            let grad = try logRegGradient(points, w: w).reduce { zip($0, $1).map { $0 + $1 } }
            for j in 0..<dim { w[j] -= grad[j] / Double(n) }
        }
        return w
    }

    /// `y x1 x2 ...` lines with y in {-1, 1}, persisted.
    static func logRegPoints(_ lines: RDD<String>, malformed: Accumulator) -> RDD<(Double, [Double])> {
        lines.mapPartitionsWithIndex { _, xs, ctx in
            xs.compactMap { l -> (Double, [Double])? in
                guard let v = numbers(l), v.count >= 2, v[0] == 1 || v[0] == -1 else {
                    if !l.allSatisfy(\.isWhitespace) { malformed.add(1, in: ctx) }
                    return nil
                }
                return (v[0], Array(v.dropFirst()))
            }
        }.persist().setName("points")
    }

    /// Each point's gradient term at `w` (summed by the caller's reduce).
    static func logRegGradient(_ points: RDD<(Double, [Double])>, w: [Double]) -> RDD<[Double]> {
        let dim = w.count
        return points.map { p -> [Double] in
            var dot = 0.0
            for j in 0..<min(dim, p.1.count) { dot += w[j] * p.1[j] }
            let scale = (1 / (1 + exp(-p.0 * dot)) - 1) * p.0
            return (0..<dim).map { j in j < p.1.count ? scale * p.1[j] : 0 }
        }.setName("gradient")
    }

    /// The log-mining example of the RDD paper: errors are persisted once,
    /// then each word is counted by its own job over the cached messages.
    public static func logMining(_ lines: RDD<String>, words: [String], client: WeftClient? = nil) throws -> [(String, Int)] {
        let messages = errorMessages(lines, client: client)
        return try words.map { w in (w, try messages.filter { $0.contains(w) }.count()) }
    }

    /// The third tab-separated field of lines starting with ERROR,
    /// persisted: reliably when a store is at hand (a lost partition is read
    /// back from a replica, not recomputed), else in memory.
    static func errorMessages(_ lines: RDD<String>, client: WeftClient?) -> RDD<String> {
        let messages = lines.filter { $0.hasPrefix("ERROR") }
            .map { l -> String in
                let f = l.split(separator: "\t", omittingEmptySubsequences: false)
                return f.count > 2 ? String(f[2]) : ""
            }.setName("errorMessages")
        if let client { messages.persistReliable(replicas: 2, codec: .string, client: client) } else { messages.persist() }
        return messages
    }

    public static func wordCount(_ lines: RDD<String>) -> RDD<(String, Int)> {
        // Tokens go straight from the line to the map-side combine table.
        // (Over a text file, tokens come straight from the file's bytes.)
        LineParserRDD<(String, Int)>(parent: lines, name: "flatMap(tokens).map((_, 1))") { line, _, emit in
            try forEachWhitespaceToken(line.assumingMemoryBound(to: UInt8.self)) { try emit(($0, 1)) }
        }
        .reduceByKey(+)
            .setName("wordCounts")
    }

    /// Spark's examples/src/main/python/pagerank.py: distinct edges, ranks
    /// start at 1.0 for every vertex with out-links, each iteration sends
    /// rank/outdegree to each neighbour and sets rank = (1-d) + d * sum. Only
    /// vertices that received a contribution in the last iteration remain.
    public static func pageRank(_ lines: RDD<String>, iterations: Int, damping: Double, malformed: Accumulator) -> RDD<(String, Double)> {
        let edges: RDD<(String, String)> = lines.mapPartitionsWithIndex { _, xs, ctx in
            var out: [(String, String)] = []
            for line in xs {
                let f = whitespaceTokens(line)
                if f.count >= 2 { out.append((f[0], f[1])) } else if !f.isEmpty { malformed.add(1, in: ctx) }
            }
            return out
        }
        return pageRank(edges: edges, iterations: iterations, damping: damping)
    }

    /// PageRank with integer vertices, for a table whose non-blank lines are
    /// all two canonical integers (no sign, no leading zero), so that the
    /// ranks are those the String job would give. A sniff of the table's
    /// first lines (up to `integerSniffLines`) comes first: a graph of named
    /// vertices gets nil and goes straight to the String job. Otherwise the
    /// returned accumulator counts the lines that were not integer edges;
    /// it is read after the ranks' action, and nonzero means the String job
    /// runs instead (only such a table computes twice).
    static func integerPageRankRDD(_ table: RDD<(Bytes, Bytes)>, iterations: Int, damping: Double,
                                   reliable: (replicas: Int, client: WeftClient)? = nil) throws -> (RDD<(Int, Double)>, Accumulator)? {
        guard try startsWithIntegerEdges(table) else { return nil }
        let lines = textLines(table)
        let other = lines.context.accumulator("not integer edges")
        return (GraphPageRank.run(edges: integerEdges(lines, malformed: other, canonical: true), iterations: iterations, damping: damping,
                                  reliable: reliable), other)
    }

    static let integerSniffLines = 1000

    /// True if the first lines of a table (its first task's) are all blank
    /// or two canonical integers.
    static func startsWithIntegerEdges(_ table: RDD<(Bytes, Bytes)>) throws -> Bool {
        guard let t = table as? TableRDD else { return true }
        struct Enough: Error {}
        var seen = 0, integers = true
        do {
            try t.lines(0) { line in
                if case .malformed = parseIntegerEdge(line, canonical: true) { integers = false }
                seen += 1
                if seen >= integerSniffLines || !integers { throw Enough() }
            }
        } catch is Enough {}
        return integers
    }

    /// `src dst` lines of non-negative integers as edges (the benchmark's
    /// graph); any other line is counted in `malformed`. With `canonical`,
    /// a number with a leading zero counts as malformed too.
    public static func integerEdges(_ lines: RDD<String>, malformed: Accumulator? = nil, canonical: Bool = false) -> RDD<(Int, Int)> {
        LineParserRDD(parent: lines, name: "edges(src dst)") { line, ctx, emit in
            switch parseIntegerEdge(line, canonical: canonical) {
            case .blank: return
            case .edge(let a, let b): try emit((a, b))
            case .malformed: malformed?.add(1, in: ctx)
            }
        }
    }

    enum EdgeLine { case blank, edge(Int, Int), malformed }

    /// Two fields of 1 to 18 digits, separated by whitespace (a CR of CRLF
    /// lines included); with `canonical`, no leading zero.
    @inline(__always)
    static func parseIntegerEdge(_ line: UnsafeRawBufferPointer, canonical: Bool) -> EdgeLine {
        let n = line.count
        // Space, tab, vertical tab, form feed, CR: not a newline, which
        // a row that did not come from a file's lines may hold.
        @inline(__always) func isSpace(_ b: UInt8) -> Bool { b == 32 || b == 9 || b == 11 || b == 12 || b == 13 }
        var i = 0
        while i < n && isSpace(line[i]) { i += 1 }
        if i == n { return .blank }   // as pagerank over text skips them
        var v = (0, 0)
        var from = i
        while i < n, case let d = line[i] &- 48, d < 10 { v.0 = v.0 &* 10 &+ Int(d); i += 1 }
        let digits0 = i - from
        let gap = i
        while i < n && isSpace(line[i]) { i += 1 }
        from = i
        while i < n, case let d = line[i] &- 48, d < 10 { v.1 = v.1 &* 10 &+ Int(d); i += 1 }
        let digits1 = i - from
        while i < n && isSpace(line[i]) { i += 1 }
        let leadingZero = canonical && ((digits0 > 1 && line[gap - digits0] == 48) || (digits1 > 1 && line[from] == 48))
        if i == n, gap < from, digits0 > 0, digits0 <= 18, digits1 > 0, digits1 <= 18, !leadingZero { return .edge(v.0, v.1) }
        return .malformed
    }

    /// PageRank over any vertex type (the benchmark uses integers), on the
    /// partitioned graph (`GraphPageRank`): links as compressed arrays per
    /// partition, each iteration's contributions summed per destination and
    /// shuffled as flat blocks.
    public static func pageRank<V: Hashable>(edges: RDD<(V, V)>, iterations: Int, damping: Double) -> RDD<(V, Double)> {
        GraphPageRank.run(edges: edges, iterations: iterations, damping: damping)
    }

    /// The same PageRank written as Spark's example is, one (vertex, value)
    /// row at a time: groupByKey, join, flatMap, reduceByKey. Kept as the
    /// reference the graph version is tested against.
    @_specialize(where V == Int)
    @_specialize(where V == String)
    public static func pageRankByJoin<V: Hashable>(edges: RDD<(V, V)>, iterations: Int, damping: Double) -> RDD<(V, Double)> {
        // Spark's edges.distinct().groupByKey(), in one shuffle: group, then
        // drop repeated destinations (first occurrence kept).
        let links = edges.groupByKey().mapValues { dsts -> [V] in
            var seen = Set<V>(minimumCapacity: dsts.count)
            return dsts.filter { seen.insert($0).inserted }
        }.persist().setName("links")
        var ranks: RDD<(V, Double)> = links.mapValues { _ in 1.0 }
        for _ in 0..<max(1, iterations) {
            // links and ranks are partitioned alike: the join is narrow, and
            // each vertex's contributions go straight into the shuffle's
            // map-side combine, with no array per vertex.
            let contribs = ElementwiseRDD<(V, ([V], Double)), (V, Double)>(parent: links.join(ranks), name: "contributions") { kv, emit in
                let (urls, rank) = kv.1
                let share = rank / Double(urls.count)
                for u in urls { try emit((u, share)) }
            }
            ranks = contribs.reduceByKey(+).mapValues { (1 - damping) + damping * $0 }.setName("ranks")
        }
        return ranks
    }

    /// Runs a job: plans it, pins the snapshot while it runs (embedded), and
    /// writes the output table in one transaction.
    public static func run(_ name: String, _ p: JobParameters, sc: DataflowContext, client: WeftClient, pin: ((Timestamp) throws -> Void)? = nil, unpin: ((Timestamp) -> Void)? = nil) throws -> JobResult {
        var params = p
        let ts = try params.at ?? blocking { try await client.now() }
        params.at = ts
        try pin?(ts)
        defer { unpin?(ts) }
        // On a cluster the executors write the output (`PartitionedOutput`);
        // the driver marks the generation first and flips the catalog last.
        // An executor's replica builds the same actions and does neither.
        let driver = sc.ownsReliableBlocks
        var distributedOutput: (name: String, generation: String)?
        if let out = params.output {
            try TableStore.checkName(out)
            if sc.actionRunner != nil {
                distributedOutput = (out, PartitionedOutput.generation(runId: sc.runId))
                if driver { try PartitionedOutput.begin(client, out, generation: distributedOutput!.generation, overwrite: params.overwrite) }
            } else if !params.overwrite, try blocking({ try await TableStore.info(client, out) }) != nil {
                throw WeftError(.invalidArgument, "output table \(out) already exists; pass --overwrite to replace it atomically")
            }
        }
        var result = JobResult()
        result.snapshotTs = ts
        final class Flag: @unchecked Sendable { var value = false }
        let flipSent = Flag()
        defer {
            if let d = distributedOutput, driver, !flipSent.value { PartitionedOutput.abandon(client, d.name, generation: d.generation) }
        }
        /// Writes `rows` on the executors and flips the catalog; the parts
        /// carry what the summary needs.
        func writeDistributed(_ rows: RDD<(Bytes, Bytes)>, keep: @escaping ([(Bytes, Bytes)]) -> [(Bytes, Bytes)]) throws -> [OutputPart] {
            let d = distributedOutput!
            let parts = try rows.mapPartitionsWithIndex { p, part, ctx in
                [try PartitionedOutput.write(client, d.name, generation: d.generation, partition: p,
                                                  base: PartitionedOutput.base(action: ctx.task.job, attempt: ctx.attempt), rows: part,
                                                  killed: { try ctx.checkKilled() }, keep: keep)]
            }.collect()
            return parts
        }
        func flip(_ parts: [OutputPart]) throws -> Timestamp? {
            guard let d = distributedOutput, driver else { return nil }
            let ts = try PartitionedOutput.finish(client, d.name, generation: d.generation, overwrite: params.overwrite, parts: parts) { flipSent.value = true }
            result.loserBlocksDeleted = PartitionedOutput.collectLosers(client, d.name, generation: d.generation, parts: parts,
                                                                        launched: sc.actionRunner?.launchedResultAttempts() ?? [])
            return ts
        }
        let malformed = sc.accumulator("malformed")
        // The job's reliable blocks (logmining's messages; only those made
        // for this job) go when it ends, whether it succeeded or not; a
        // killed job's are left for `weft job gc` (ReliableBlocks.collectGarbage).
        let reliableMark = sc.reliableMark()
        defer { try? sc.releaseReliableBlocks(since: reliableMark) }
        // PageRank over integer vertices keeps its ranks typed: the summary
        // takes the top 10 in one pass, and rows are made only for an output.
        if name == "pagerank", let (ranksRDD, other) = try integerPageRankRDD(try sc.table(params.input, client: client, at: ts),
                                                                             iterations: params.iterations, damping: params.damping,
                                                                             reliable: params.reliable > 0 ? (params.reliable, client) : nil) {
            var ranks: [(Int, Double)] = []
            var count = 0
            var parts: [OutputPart] = []
            if distributedOutput != nil {
                // Each partition keeps its top 10 for the summary.
                parts = try writeDistributed(ranksRDD.map { (Array(String($0.0).utf8), Array("\($0.1)".utf8)) }) { rows in
                    topRanks(rows.map { (Int(String(decoding: $0.0, as: UTF8.self)) ?? 0, Double(String(decoding: $0.1, as: UTF8.self)) ?? 0) }, 10)
                        .map { (Array(String($0.0).utf8), Array("\($0.1)".utf8)) }
                }
                count = parts.reduce(0) { $0 + $1.rows }
                ranks = parts.flatMap(\.kept).map { (Int(String(decoding: $0.0, as: UTF8.self)) ?? 0, Double(String(decoding: $0.1, as: UTF8.self)) ?? 0) }
            } else {
                ranks = try ranksRDD.collect()
                count = ranks.count
            }
            if other.value == 0 {
                result.metrics = sc.totalMetrics
                result.outputRows = count
                result.summary.append("\(count) ranked vertices after \(params.iterations) iterations (damping \(params.damping))")
                let top = topRanks(ranks, 10)
                result.summary.append("top \(top.count): " + top.map { String(format: "%@ %.6f", String($0.0), $0.1) }.joined(separator: ", "))
                if distributedOutput != nil {
                    result.committedTs = try flip(parts)
                } else if let out = params.output {
                    let rows = ranks.map { RowBox(key: Array(String($0.0).utf8), value: Array("\($0.1)".utf8)) }
                    let ow = params.overwrite
                    result.committedTs = try writeOutput(client, out, rows.map { ($0.key, $0.value) }, overwrite: ow)
                }
                return result
            }
            // Not all integer edges after all: the String job below (the
            // blocks written for the integer one stay unnamed, and go with
            // the generation).
        }
        let rdd = try plan(name, params, sc: sc, client: client, malformed: malformed)
        let rows: [(Bytes, Bytes)]
        let count: Int
        let valueSum: Int
        var parts: [OutputPart] = []
        if distributedOutput != nil {
            parts = try writeDistributed(rdd, keep: Self.summaryRows(name))
            rows = parts.flatMap(\.kept)
            count = parts.reduce(0) { $0 + $1.rows }
            valueSum = parts.reduce(0) { $0 &+ $1.valueSum }
        } else {
            rows = try rdd.collect()
            count = rows.count
            valueSum = name == "wordcount" ? rows.reduce(0) { $0 &+ (Int(String(decoding: $1.1, as: UTF8.self)) ?? 0) } : 0
        }
        result.metrics = sc.totalMetrics
        result.outputRows = count
        result.malformedLines = Int(malformed.value)
        switch name {
        case "wordcount":
            let counts = rows.map { (String(decoding: $0.0, as: UTF8.self), Int(String(decoding: $0.1, as: UTF8.self)) ?? 0) }
            result.summary.append("\(count) distinct words, \(valueSum) words in all")
            let top = counts.sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }.prefix(20)
            result.summary.append("top \(top.count): " + top.map { "\($0.0) \($0.1)" }.joined(separator: ", "))
        case "pagerank":
            let ranks = rows.map { (String(decoding: $0.0, as: UTF8.self), Double(String(decoding: $0.1, as: UTF8.self)) ?? 0) }
            result.summary.append("\(count) ranked vertices after \(params.iterations) iterations (damping \(params.damping))")
            let top = ranks.sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }.prefix(10)
            result.summary.append("top \(top.count): " + top.map { String(format: "%@ %.6f", $0.0, $0.1) }.joined(separator: ", "))
        case "kmeans":
            result.summary.append("\(count) centres after \(params.iterations) iterations: " + rows.map { "[\(String(decoding: $0.1, as: UTF8.self))]" }.joined(separator: " "))
        case "logreg":
            result.summary.append("weights after \(params.iterations) iterations: " + rows.map { String(decoding: $0.1, as: UTF8.self) }.joined(separator: " "))
        case "logmining":
            result.summary.append(rows.map { "\(String(decoding: $0.0, as: UTF8.self)) \(String(decoding: $0.1, as: UTF8.self))" }.joined(separator: ", "))
        case "join":
            result.summary.append("\(count) matching pairs")
        case _ where registeredJob(name) != nil:
            result.summary.append("\(count) output rows")
        case "sort":
            let first = rows.min { compareBytes($0.0, $1.0) < 0 }.map { String(decoding: $0.1, as: UTF8.self).replacingOccurrences(of: "\t", with: " ") } ?? "-"
            result.summary.append("\(count) rows sorted; first: \(first)")
        default: break
        }
        if result.malformedLines > 0 { result.summary.append("\(result.malformedLines) malformed input lines were skipped (counted, not silently dropped)") }
        if distributedOutput != nil {
            result.committedTs = try flip(parts)
        } else if let out = params.output {
            let boxed = rows.map { RowBox(key: $0.0, value: $0.1) }
            let ow = params.overwrite
            result.committedTs = try writeOutput(client, out, boxed.map { ($0.key, $0.value) }, overwrite: ow)
        }
        return result
    }

    /// The rows of one output partition a job's summary needs, when the
    /// executors write the output and only these reach the driver: word
    /// count's 20 most frequent, PageRank's 10 highest, sort's first, every
    /// row of the small outputs (k-means' centres, logistic regression's
    /// weights, log mining's counts), and none for the rest.
    static func summaryRows(_ name: String) -> ([(Bytes, Bytes)]) -> [(Bytes, Bytes)] {
        func top(_ k: Int, _ rows: [(Bytes, Bytes)], _ score: (Bytes) -> Double) -> [(Bytes, Bytes)] {
            let text = { (b: Bytes) in String(decoding: b, as: UTF8.self) }
            return Array(rows.map { ($0, score($0.1)) }.sorted { $0.1 != $1.1 ? $0.1 > $1.1 : text($0.0.0) < text($1.0.0) }.prefix(k).map(\.0))
        }
        switch name {
        case "wordcount": return { top(20, $0) { Double(Int(String(decoding: $0, as: UTF8.self)) ?? 0) } }
        case "pagerank": return { top(10, $0) { Double(String(decoding: $0, as: UTF8.self)) ?? 0 } }
        case "sort": return { rows in rows.min { compareBytes($0.0, $1.0) < 0 }.map { [$0] } ?? [] }
        case "kmeans", "logreg", "logmining": return { $0 }
        default: return { _ in [] }
        }
    }
}

/// How long a job keeps trying to write its output while a participant is
/// unreachable (one killed during the job and restarting, say).
public let outputWriteRetryMillis: UInt64 = 20_000

/// The job's output table, in one transaction; retried while a
/// participant is unreachable or restarting, up to `outputWriteRetryMillis`.
func writeOutput(_ client: WeftClient, _ name: String, _ rows: [(Bytes, Bytes)], overwrite: Bool) throws -> Timestamp {
    let boxed = rows.map { RowBox(key: $0.0, value: $0.1) }
    let deadline = wallMillis() + outputWriteRetryMillis
    var pause: UInt32 = 50_000
    while true {
        do {
            return try blocking { try await TableStore.write(client, name, rows: boxed.map { ($0.key, $0.value) }, format: "kv", overwrite: overwrite) }
        } catch let e as WeftError where [.unavailable, .outcomeUnknown, .timeout, .aborted].contains(e.code) && wallMillis() < deadline {
            // A block write whose outcome is unknown is written again under
            // a new generation; the old one is left to `table gc`.
            usleep(pause)
            pause = min(pause * 2, 1_000_000)
        }
    }
}

/// The `k` highest ranks, highest first, ties by the vertex's text (the
/// order the String job gives), in one pass.
func topRanks(_ ranks: [(Int, Double)], _ k: Int) -> [(Int, Double)] {
    func before(_ a: (Int, Double), _ b: (Int, Double)) -> Bool { a.1 != b.1 ? a.1 > b.1 : String(a.0) < String(b.0) }
    var top: [(Int, Double)] = []
    for r in ranks {
        if top.count == k, !before(r, top[k - 1]) { continue }
        let at = top.firstIndex { before(r, $0) } ?? top.count
        top.insert(r, at: at)
        if top.count > k { top.removeLast() }
    }
    return top
}

/// A finite decimal number such as `-12`, `3.5` or `1e6` (not `nan`,
/// `inf` or hex), so such keys sort numerically.
func isPlainNumber(_ s: String) -> Bool {
    guard !s.isEmpty, s.utf8.allSatisfy({ ($0 >= 48 && $0 <= 57) || $0 == 43 || $0 == 45 || $0 == 46 || $0 == 101 || $0 == 69 }),
          let d = Double(s) else { return false }
    return d.isFinite
}

/// A numeric sort key that keeps the original text.
struct NumericKey: Comparable, Hashable {
    let value: Double
    let text: String
    init(_ v: Double, _ t: String) { value = v; text = t }
    static func < (a: NumericKey, b: NumericKey) -> Bool { a.value != b.value ? a.value < b.value : a.text < b.text }
}
