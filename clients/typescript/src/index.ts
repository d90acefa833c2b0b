/** tokenwire client for Node: ordered, verified LLM token streams over gRPC. */

export * from "./client.js";
export * from "./errors.js";
export * from "./observed.js";
export * from "./stream.js";
export * from "./tools.js";
export * as pb from "./gen/tokenwire/v1/respond_pb.js";
