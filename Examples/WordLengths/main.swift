// A program with its own dataflow job, run on a Weft cluster whose nodes
// are this same program (so every executor knows the job).
//
//   weft cluster start --dir /tmp/c                  # the cluster's files and store
//   weft table load corpus words.txt --cluster /tmp/c
//   # serve the participants with this program instead of `weft node`:
//   weft-example-wordlengths node --cluster /tmp/c --id participant-0   (and -1, -2)
//   weft-example-wordlengths run --cluster /tmp/c --input corpus --output lengths
//
// The job: how many words have each length (in UTF-8 bytes).
import Foundation
import WeftCore
import WeftDataflow

BuiltinJobs.register("wordlengths", about: "how many words (runs of non-whitespace) have each length in bytes; output length -> count") { params, sc, client in
    try sc.table(params.input, client: client, at: params.at)
        .values()
        .flatMap { line in line.split(whereSeparator: { $0 == 32 || $0 == 9 || $0 == 13 }).map { ($0.count, 1) } }
        .reduceByKey(+)
        .map { (Array(String($0.0).utf8), Array(String($0.1).utf8)) }
}

func option(_ name: String) -> String? {
    let args = CommandLine.arguments
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    return args[i + 1]
}

func usage() -> Never {
    FileHandle.standardError.write(Data("usage: weft-example-wordlengths node --cluster DIR --id ID | run --cluster DIR --input TABLE [--output TABLE]\n".utf8))
    exit(2)
}

guard CommandLine.arguments.count > 1, let cluster = option("--cluster") else { usage() }
do {
    switch CommandLine.arguments[1] {
    case "node":
        guard let id = option("--id") else { usage() }
        try WeftNode.serve(clusterPath: cluster, id: id)
    case "run":
        guard let input = option("--input") else { usage() }
        var p = JobParameters(input: input)
        p.output = option("--output")
        let (result, dist) = try WeftNode.run("wordlengths", p, clusterPath: cluster)
        print("\(result.outputRows) lengths; tasks by executor: \(dist.tasksByExecutor.sorted { $0.key < $1.key }.map { "participant-\($0.key)=\($0.value)" }.joined(separator: " "))")
        if let ts = result.committedTs { print("output committed at ts=\(ts)") }
    default:
        usage()
    }
} catch let e as WeftError {
    FileHandle.standardError.write(Data("error: \(e.message)\n".utf8))
    exit(1)
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(1)
}
