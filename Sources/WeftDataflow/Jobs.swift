import Foundation
import WeftCore
import WeftRuntime

/// What a built-in job needs: its input snapshot and parameters.
public struct JobParameters: Sendable {
    public var input: String
    public var output: String?
    public var at: Timestamp?
    public var iterations = 10
    public var damping = 0.85
    public var overwrite = false
    public init(input: String) { self.input = input }
}

public struct JobResult: Sendable {
    public var summary: [String] = []
    public var outputRows = 0
    public var malformedLines = 0
    public var metrics = JobMetrics()
    public var snapshotTs: Timestamp = 0
    public var committedTs: Timestamp?
}

/// Jobs are registered by name in the binary: a process rebuilds the same
/// lineage from (job, parameters, snapshot), so a task can be named rather
/// than shipped as a closure.
public enum BuiltinJobs {
    public static let all: [(name: String, about: String)] = [
        ("wordcount", "count of every word (maximal runs of non-whitespace) in a table of lines; output word -> count"),
        ("pagerank", "PageRank over `src dst` lines, as Spark's bundled example (--iterations, --damping); output vertex -> rank"),
    ]

    /// Builds the job's final RDD (output rows) without running it.
    public static func plan(_ name: String, _ p: JobParameters, sc: DataflowContext, client: WeftClient, malformed: Accumulator) throws -> RDD<(Bytes, Bytes)> {
        let input = try sc.table(p.input, client: client, at: p.at).values().map { String(decoding: $0, as: UTF8.self) }
        switch name {
        case "wordcount":
            return wordCount(input).map { (Array($0.0.utf8), Array(String($0.1).utf8)) }
        case "pagerank":
            return pageRank(input, iterations: p.iterations, damping: p.damping, malformed: malformed)
                .map { (Array($0.0.utf8), Array(String($0.1).utf8)) }
        default:
            throw WeftError(.invalidArgument, "unknown job \(name); `weft job list` shows the jobs (\(all.map(\.name).joined(separator: ", ")))")
        }
    }

    public static func wordCount(_ lines: RDD<String>) -> RDD<(String, Int)> {
        lines.flatMap { $0.split(whereSeparator: { $0.isWhitespace }).map(String.init) }
            .map { ($0, 1) }
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
                let f = line.split(whereSeparator: { $0.isWhitespace })
                if f.count >= 2 { out.append((String(f[0]), String(f[1]))) } else if !line.allSatisfy(\.isWhitespace) { malformed.add(1, in: ctx) }
            }
            return out
        }
        let links = edges.map { EdgeKey(src: $0.0, dst: $0.1) }.distinct().map { ($0.src, $0.dst) }.groupByKey().persist().setName("links")
        var ranks: RDD<(String, Double)> = links.mapValues { _ in 1.0 }
        for _ in 0..<max(1, iterations) {
            let contribs = links.join(ranks).flatMap { kv -> [(String, Double)] in
                let (urls, rank) = kv.1
                return urls.map { ($0, rank / Double(urls.count)) }
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
        if let out = params.output {
            try TableStore.checkName(out)
            if !params.overwrite, try blocking({ try await TableStore.info(client, out) }) != nil {
                throw WeftError(.invalidArgument, "output table \(out) already exists; pass --overwrite to replace it atomically")
            }
        }
        let malformed = sc.accumulator("malformed")
        let rdd = try plan(name, params, sc: sc, client: client, malformed: malformed)
        var result = JobResult()
        result.snapshotTs = ts
        let rows = try rdd.collect()
        result.metrics = sc.totalMetrics
        result.outputRows = rows.count
        result.malformedLines = Int(malformed.value)
        switch name {
        case "wordcount":
            let counts = rows.map { (String(decoding: $0.0, as: UTF8.self), Int(String(decoding: $0.1, as: UTF8.self)) ?? 0) }
            result.summary.append("\(counts.count) distinct words, \(counts.reduce(0) { $0 + $1.1 }) words in all")
            let top = counts.sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }.prefix(20)
            result.summary.append("top \(top.count): " + top.map { "\($0.0) \($0.1)" }.joined(separator: ", "))
        case "pagerank":
            let ranks = rows.map { (String(decoding: $0.0, as: UTF8.self), Double(String(decoding: $0.1, as: UTF8.self)) ?? 0) }
            result.summary.append("\(ranks.count) ranked vertices after \(params.iterations) iterations (damping \(params.damping))")
            let top = ranks.sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }.prefix(10)
            result.summary.append("top \(top.count): " + top.map { String(format: "%@ %.6f", $0.0, $0.1) }.joined(separator: ", "))
        default: break
        }
        if result.malformedLines > 0 { result.summary.append("\(result.malformedLines) malformed input lines were skipped (counted, not silently dropped)") }
        if let out = params.output {
            let boxed = rows.map { RowBox(key: $0.0, value: $0.1) }
            let ow = params.overwrite
            result.committedTs = try blocking { try await TableStore.write(client, out, rows: boxed.map { ($0.key, $0.value) }, format: "kv", overwrite: ow) }
        }
        return result
    }
}

struct EdgeKey: Hashable {
    let src: String
    let dst: String
}
