import XCTest
final class PWeftLMDBTests: XCTestCase { func testNothing() {} }
